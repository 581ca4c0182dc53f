/* fetd_vhost._vcopy: the compiled build's copy between one contiguous buffer
 * and a request's guest buffers (decisions 0313, 0314).
 *
 * A request's buffers are runs of guest memory: a flat list of ints, three
 * per run (region index, offset in that region, length), as the descriptor
 * walk made them; `regions` is the memory table's list of region buffers.
 *
 * scatter(src, regions, runs, offset) -> int
 *     Copy src into the concatenation of the runs from byte `offset` on,
 *     clipped to their end: bytes copied.
 * gather(dst, regions, runs, offset) -> int
 *     Copy the concatenation of the runs from byte `offset` on into the start
 *     of dst, at most len(dst) bytes: bytes copied.
 *
 * Every run the copy touches is checked again before the first byte moves: a
 * region index inside the table, a non-negative offset and length, the run
 * inside its region's buffer (a hostile guest's chain never reaches outside
 * the table, even if the walk had let it through). Only the regions those
 * runs name are acquired (pinned), writable for scatter. A bad run or
 * buffer raises, and nothing is written. The GIL is released around a large
 * copy only; the Py_buffers held keep every mapping alive meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define NOGIL_MIN (64 * 1024)   /* below this, dropping the GIL costs more than it lends */

typedef struct {
    Py_ssize_t region, offset, length;
} Run;

typedef struct {
    Py_buffer *bufs;    /* one per region, acquired only where `held` says so */
    char *held;
    Py_ssize_t nregions;
    Run *runs;          /* the runs the copy touches, checked */
    Py_ssize_t nruns;
    Py_ssize_t skip;    /* bytes of runs[0] before the copy starts */
    Py_ssize_t total;   /* bytes the copy moves */
} Plan;

static void
unplan(Plan *p)
{
    for (Py_ssize_t i = 0; i < p->nregions; i++)
        if (p->held[i])
            PyBuffer_Release(&p->bufs[i]);
    PyMem_Free(p->bufs);
    PyMem_Free(p->held);
    PyMem_Free(p->runs);
}

/* An int of the runs (an int itself: no __index__ runs Python code mid-plan). */
static int
field(PyObject *runs, Py_ssize_t i, Py_ssize_t *out)
{
    PyObject *item = PyList_GET_ITEM(runs, i);
    if (!PyLong_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "runs must be ints");
        return -1;
    }
    *out = PyLong_AsSsize_t(item);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* Check the runs that `want` bytes from byte `offset` on touch, and pin
 * their regions with `flags`: the plan of the copy, or -1 with an exception
 * set and nothing pinned. */
static int
plan(PyObject *regions, PyObject *runs, Py_ssize_t offset, Py_ssize_t want, int flags, Plan *p)
{
    memset(p, 0, sizeof *p);
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(runs);
    if (n % 3) {
        PyErr_SetString(PyExc_ValueError, "runs must be three ints each");
        return -1;
    }
    p->nregions = PyList_GET_SIZE(regions);
    p->bufs = PyMem_New(Py_buffer, p->nregions ? p->nregions : 1);
    p->held = PyMem_Calloc(p->nregions ? p->nregions : 1, 1);
    p->runs = PyMem_New(Run, n ? n / 3 : 1);
    if (p->bufs == NULL || p->held == NULL || p->runs == NULL) {
        unplan(p);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n && p->total < want; i += 3) {
        Run r;
        if (field(runs, i, &r.region) < 0 || field(runs, i + 1, &r.offset) < 0 || field(runs, i + 2, &r.length) < 0)
            goto fail;
        if (r.length < 0) {
            PyErr_Format(PyExc_ValueError, "run %zd: negative length", i / 3);
            goto fail;
        }
        if (offset >= r.length && !p->nruns) {    /* before the copy's start: not touched */
            offset -= r.length;
            continue;
        }
        if (r.region < 0 || r.region >= p->nregions) {
            PyErr_Format(PyExc_ValueError, "run %zd: region %zd is not in a table of %zd", i / 3, r.region,
                         p->nregions);
            goto fail;
        }
        if (!p->held[r.region]) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(regions, r.region), &p->bufs[r.region], flags) < 0)
                goto fail;
            p->held[r.region] = 1;
        }
        if (r.offset < 0 || r.offset > p->bufs[r.region].len - r.length) {
            PyErr_Format(PyExc_ValueError, "run %zd: %zd+%zd is outside its region of %zd bytes", i / 3,
                         r.offset, r.length, p->bufs[r.region].len);
            goto fail;
        }
        if (!p->nruns) {
            p->skip = offset;
            r.length -= offset;
        }
        p->runs[p->nruns++] = r;
        p->total += r.length;
    }
    if (p->total > want)
        p->total = want;
    return 0;
fail:
    unplan(p);
    return -1;
}

/* Move p->total bytes between `flat` and the planned runs (into the runs when `into`). */
static void
copy(Plan *p, char *flat, int into)
{
    int nogil = p->total >= NOGIL_MIN;
    PyThreadState *ts = nogil ? PyEval_SaveThread() : NULL;
    Py_ssize_t left = p->total;
    for (Py_ssize_t i = 0; i < p->nruns && left; i++) {
        Run *r = &p->runs[i];
        char *guest = (char *)p->bufs[r->region].buf + r->offset + (i ? 0 : p->skip);
        Py_ssize_t take = r->length < left ? r->length : left;
        if (into)
            memmove(guest, flat, (size_t)take);
        else
            memmove(flat, guest, (size_t)take);
        flat += take;
        left -= take;
    }
    if (nogil)
        PyEval_RestoreThread(ts);
}

static PyObject *
scatter(PyObject *self, PyObject *args)
{
    Py_buffer src;
    PyObject *regions, *runs;
    Py_ssize_t offset;
    Plan p;
    if (!PyArg_ParseTuple(args, "y*O!O!n:scatter", &src, &PyList_Type, &regions, &PyList_Type, &runs, &offset))
        return NULL;
    if (plan(regions, runs, offset, src.len, PyBUF_WRITABLE, &p) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    copy(&p, src.buf, 1);
    Py_ssize_t done = p.total;
    unplan(&p);
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(done);
}

static PyObject *
gather(PyObject *self, PyObject *args)
{
    Py_buffer dst;
    PyObject *regions, *runs;
    Py_ssize_t offset;
    Plan p;
    if (!PyArg_ParseTuple(args, "w*O!O!n:gather", &dst, &PyList_Type, &regions, &PyList_Type, &runs, &offset))
        return NULL;
    if (plan(regions, runs, offset, dst.len, PyBUF_SIMPLE, &p) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    copy(&p, dst.buf, 0);
    Py_ssize_t done = p.total;
    unplan(&p);
    PyBuffer_Release(&dst);
    return PyLong_FromSsize_t(done);
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, "Copy a buffer into guest memory runs from an offset on: bytes copied."},
    {"gather", gather, METH_VARARGS, "Copy guest memory runs from an offset on into a buffer: bytes copied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fetd_vhost._vcopy",
    "fetd_vhost's copies between one buffer and a chain's guest memory runs (decisions 0313, 0314).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__vcopy(void)
{
    return PyModule_Create(&module);
}
