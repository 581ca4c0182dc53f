/* backends._rbdaio: the compiled build's shortcut for the RBD aio path
 * (decision 0421). One C call starts an aio read or write of one buffer
 * (the completion created, the call made, the completion released when
 * librbd refuses the call) and one C call collects every finished call
 * (rbd_poll_io_events, each completion's return value and release), where
 * backends.librbd's ctypes path makes four foreign calls per command, each
 * thousands of instructions in ctypes and libffi. librbd's functions come as
 * addresses from the library backends.librbd loaded: nothing here links to
 * librbd. The GIL is let go around librbd's code, as ctypes does. Built by
 * scripts/build-accel; without a build, backends.librbd's ctypes path runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

typedef int (*create_fn)(void *, void *, void **);
typedef int (*io_fn)(void *, uint64_t, size_t, const void *, void *);
typedef int (*poll_fn)(void *, void **, int);
typedef ssize_t (*value_fn)(void *);
typedef void (*release_fn)(void *);

#define BATCH 64

/* librbd's calls and the image, from `calls`:
 * (image, create, release, get_return_value, poll_io_events) as addresses */
typedef struct { void *image; create_fn create; release_fn release; value_fn value; poll_fn poll; } calls_t;

static int unpack(PyObject *t, calls_t *c) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) {
        PyErr_SetString(PyExc_TypeError, "calls: (image, create, release, value, poll)");
        return -1;
    }
    c->image = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 0));
    c->create = (create_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 1));
    c->release = (release_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 2));
    c->value = (value_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 3));
    c->poll = (poll_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 4));
    return PyErr_Occurred() ? -1 : 0;
}

/* start_buffer(fast, name, offset, buffer, writable) -> (completion, pin,
 * bytes): rbd_aio_NAME (read or write) of the whole buffer at `offset`, as
 * backends.librbd's Image.start_buffer, which this is when the build has it
 * (a partial over `fast`: (calls, {name: address}, the error class), so no
 * Python frame runs). The pin is a new memoryview of the buffer, whose
 * export holds it until the caller drops the pin after the completion; a
 * call librbd refuses raises the error class (errno, message), its
 * completion released. */
static PyObject *start_buffer(PyObject *mod, PyObject *const *args, Py_ssize_t n) {
    calls_t c;
    if (n != 5 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 3) {
        PyErr_SetString(PyExc_TypeError, "start_buffer((calls, ios, error), name, offset, buffer, writable)");
        return NULL;
    }
    PyObject *fast = args[0], *name = args[1];
    if (unpack(PyTuple_GET_ITEM(fast, 0), &c) < 0)
        return NULL;
    PyObject *addr = PyDict_GetItemWithError(PyTuple_GET_ITEM(fast, 1), name);
    if (addr == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, name);
        return NULL;
    }
    io_fn io = (io_fn)PyLong_AsVoidPtr(addr);
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[2]);
    int writable = PyObject_IsTrue(args[4]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *pin = PyMemoryView_FromObject(args[3]);
    if (pin == NULL)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(pin, &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        Py_DECREF(pin);
        return NULL;
    }
    void *comp = NULL;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = c.create(NULL, NULL, &comp);
    if (ret >= 0) {
        ret = io(c.image, offset, (size_t)view.len, view.buf, comp);
        if (ret < 0)
            c.release(comp);
    }
    Py_END_ALLOW_THREADS
    Py_ssize_t len = view.len;
    PyBuffer_Release(&view);
    if (ret < 0) {
        Py_DECREF(pin);
        PyObject *e = PyObject_CallFunction(PyTuple_GET_ITEM(fast, 2), "iN", -ret,
                                            PyUnicode_FromFormat("rbd_aio_%U: %s", name, strerror(-ret)));
        if (e != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(e), e);
            Py_DECREF(e);
        }
        return NULL;
    }
    return Py_BuildValue("(NNn)", PyLong_FromVoidPtr(comp), pin, len);
}

/* collect(calls): [(completion address, return value)] of every finished
 * call, each completion released. */
static PyObject *collect(PyObject *mod, PyObject *calls) {
    calls_t c;
    if (unpack(calls, &c) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    void *comps[BATCH];
    ssize_t rets[BATCH];
    int got;
    do {
        Py_BEGIN_ALLOW_THREADS
        got = c.poll(c.image, comps, BATCH);
        for (int i = 0; i < got; i++) {
            rets[i] = c.value(comps[i]);
            c.release(comps[i]);
        }
        Py_END_ALLOW_THREADS
        for (int i = 0; i < got; i++) {
            PyObject *item = Py_BuildValue("(Nn)", PyLong_FromVoidPtr(comps[i]), (Py_ssize_t)rets[i]);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);   /* (out of memory: these calls' futures stay pending) */
                return NULL;
            }
            Py_DECREF(item);
        }
    } while (got == BATCH);
    return out;
}

static PyMethodDef methods[] = {
    {"start_buffer", (PyCFunction)(void (*)(void))start_buffer, METH_FASTCALL,
     "start_buffer((calls, ios, error), name, offset, buffer, writable)"},
    {"collect", collect, METH_O, "collect(calls)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "backends._rbdaio", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rbdaio(void) { return PyModule_Create(&module); }
