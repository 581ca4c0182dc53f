/* fetd_vhost._vcopy: the compiled build's copy between one contiguous buffer
 * and a request's guest buffers (decision 0313).
 *
 * scatter(src, views, offset) -> int
 *     Copy src into the concatenation of `views` (writable buffers, a chain's
 *     guest pages) from byte `offset` on, clipped to their end: bytes copied.
 * gather(views, dst) -> int
 *     Copy the concatenation of `views` into the start of `dst`: bytes copied.
 *
 * Every buffer is acquired (pinned) before the first byte moves, and each
 * copy is bounded by its own buffer's length: a segment that is not a
 * contiguous (writable, for scatter) buffer, or more data than `dst` holds,
 * raises before anything is written. The GIL is released around a large copy
 * only; the Py_buffers held keep every mapping alive meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define NOGIL_MIN (64 * 1024)   /* below this, dropping the GIL costs more than it lends */

typedef struct {
    Py_buffer *bufs;
    Py_ssize_t n;
} Pinned;

static void
unpin(Pinned *p)
{
    for (Py_ssize_t i = 0; i < p->n; i++)
        PyBuffer_Release(&p->bufs[i]);
    PyMem_Free(p->bufs);
    p->bufs = NULL;
    p->n = 0;
}

/* Acquire every item of the list `views` with `flags` (PyBUF_SIMPLE: contiguous). */
static int
pin(PyObject *views, int flags, Pinned *p)
{
    p->bufs = NULL;
    p->n = 0;
    if (!PyList_Check(views)) {
        PyErr_SetString(PyExc_TypeError, "views must be a list of buffers");
        return -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(views);
    p->bufs = PyMem_New(Py_buffer, count ? count : 1);
    if (p->bufs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(views, i), &p->bufs[i], flags) < 0) {
            unpin(p);
            return -1;
        }
        p->n = i + 1;
    }
    return 0;
}

static PyObject *
scatter(PyObject *self, PyObject *args)
{
    Py_buffer src;
    PyObject *views;
    Py_ssize_t offset;
    Pinned p;
    if (!PyArg_ParseTuple(args, "y*O!n:scatter", &src, &PyList_Type, &views, &offset))
        return NULL;
    if (offset < 0) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    if (pin(views, PyBUF_WRITABLE, &p) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const char *from = src.buf;
    Py_ssize_t left = src.len, done = 0, i = 0;
    for (; i < p.n && offset >= p.bufs[i].len; i++)
        offset -= p.bufs[i].len;
    int nogil = left >= NOGIL_MIN;
    PyThreadState *ts = nogil ? PyEval_SaveThread() : NULL;
    for (; i < p.n && left; i++) {
        Py_ssize_t room = p.bufs[i].len - offset;
        Py_ssize_t take = room < left ? room : left;
        memmove((char *)p.bufs[i].buf + offset, from + done, (size_t)take);
        done += take;
        left -= take;
        offset = 0;
    }
    if (nogil)
        PyEval_RestoreThread(ts);
    unpin(&p);
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(done);
}

static PyObject *
gather(PyObject *self, PyObject *args)
{
    PyObject *views;
    Py_buffer dst;
    Pinned p;
    if (!PyArg_ParseTuple(args, "O!w*:gather", &PyList_Type, &views, &dst))
        return NULL;
    if (pin(views, PyBUF_SIMPLE, &p) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < p.n; i++)
        total += p.bufs[i].len;
    if (total > dst.len) {
        unpin(&p);
        PyBuffer_Release(&dst);
        PyErr_Format(PyExc_ValueError, "%zd bytes do not fit a buffer of %zd", total, dst.len);
        return NULL;
    }
    int nogil = total >= NOGIL_MIN;
    PyThreadState *ts = nogil ? PyEval_SaveThread() : NULL;
    char *to = dst.buf;
    for (Py_ssize_t i = 0; i < p.n; i++) {
        memmove(to, p.bufs[i].buf, (size_t)p.bufs[i].len);
        to += p.bufs[i].len;
    }
    if (nogil)
        PyEval_RestoreThread(ts);
    unpin(&p);
    PyBuffer_Release(&dst);
    return PyLong_FromSsize_t(total);
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, "Copy a buffer into a list of buffers from an offset on: bytes copied."},
    {"gather", gather, METH_VARARGS, "Copy a list of buffers into one buffer: bytes copied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fetd_vhost._vcopy",
    "fetd_vhost's copies between one buffer and a chain's guest buffers (decision 0313).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__vcopy(void)
{
    return PyModule_Create(&module);
}
