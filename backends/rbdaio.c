/* backends._rbdaio: the compiled build's shortcut for the RBD aio path
 * (decision 0421). One C call starts an aio read or write of one buffer
 * (the completion created, the call recorded, the call made, the completion
 * released when librbd refuses it) and one C call collects every finished
 * call (rbd_poll_io_events, each completion's return value and release),
 * where backends.librbd's ctypes path makes four foreign calls per command,
 * each thousands of instructions in ctypes and libffi. librbd's functions
 * come as addresses from the library backends.librbd loaded: nothing here
 * links to librbd. The GIL is let go around librbd's code, as ctypes does.
 * Built by scripts/build-accel; without a build, backends.librbd's ctypes
 * path runs.
 *
 * Out of memory never leaves librbd with a buffer nobody holds, nor a call
 * nobody will hear of (decision 0422): everything a start needs is made
 * before librbd gets the call, and a collection that cannot hand a finished
 * call over keeps it, unreleased, for the next one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

typedef int (*create_fn)(void *, void *, void **);
typedef int (*io_fn)(void *, uint64_t, size_t, const void *, void *);
typedef int (*poll_fn)(void *, void **, int);
typedef ssize_t (*value_fn)(void *);
typedef void (*release_fn)(void *);

#define BATCH 64
#define NCALLS 7

/* What collect() polled and could not hand over (out of memory): completions
 * not yet released, taken first by the next collect() of the image. In a
 * bytearray the image owns (calls' sixth item), so it goes with the image. */
typedef struct { Py_ssize_t n; void *comps[BATCH]; } carry_t;

/* librbd's calls and the image, from `calls`: (image, create, release,
 * get_return_value, poll_io_events as addresses, the carry, the eventfd) */
typedef struct {
    void *image; create_fn create; release_fn release; value_fn value; poll_fn poll;
    carry_t *carry; int fd;
} calls_t;

/* The calls' tuple checked and read into a calls_t (starter(), collector()). */
static int unpack(PyObject *t, calls_t *c) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != NCALLS || !PyByteArray_Check(PyTuple_GET_ITEM(t, 5))
            || PyByteArray_GET_SIZE(PyTuple_GET_ITEM(t, 5)) < (Py_ssize_t)sizeof(carry_t)) {
        PyErr_SetString(PyExc_TypeError, "calls: (image, create, release, value, poll, carry, fd)");
        return -1;
    }
    c->image = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 0));
    c->create = (create_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 1));
    c->release = (release_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 2));
    c->value = (value_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 3));
    c->poll = (poll_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 4));
    c->carry = (carry_t *)PyByteArray_AS_STRING(PyTuple_GET_ITEM(t, 5));
    c->fd = _PyLong_AsInt(PyTuple_GET_ITEM(t, 6));
    return PyErr_Occurred() ? -1 : 0;
}

/* (calls, calls_t as bytes): what starter() and collector() bind, so that a
 * start or a collect reads its pointers from one struct, not from seven
 * Python ints per call. The tuple keeps the carry's bytearray alive, and
 * nothing resizes it (backends.librbd makes it once, one batch long). */
static PyObject *bind_calls(PyObject *calls) {
    calls_t c;
    if (unpack(calls, &c) < 0)
        return NULL;
    PyObject *blob = PyBytes_FromStringAndSize((const char *)&c, sizeof c);
    if (blob == NULL)
        return NULL;
    PyObject *bound = PyTuple_Pack(2, calls, blob);
    Py_DECREF(blob);
    return bound;
}

static const calls_t *bound_calls(PyObject *bound) {
    return (const calls_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(bound, 1));
}

/* Raise fast's error class (errno, "rbd_aio_WHAT: strerror") for librbd's
 * return value `ret`; NULL. */
static PyObject *fail(PyObject *fast, int ret, const char *what) {
    PyObject *e = PyObject_CallFunction(PyTuple_GET_ITEM(fast, 2), "iN", -ret,
                                        PyUnicode_FromFormat("rbd_aio_%s: %s", what ? what : "?", strerror(-ret)));
    if (e != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(e), e);
        Py_DECREF(e);
    }
    return NULL;
}

/* start_buffer(name, offset, buffer, writable, future, pending), bound to
 * `fast` (calls, {name: address}, the error class) by starter(): rbd_aio_NAME
 * (read or write) of the whole buffer at `offset`, recorded as
 * pending[completion] = (future, pin, bytes a read must report) before
 * librbd gets it, as backends.librbd's Image.start_buffer, which this is
 * when the build has it (no Python frame runs). The pin is a new memoryview
 * of the buffer, whose export holds it until the entry is dropped after the
 * completion. A call librbd refuses raises the error class (errno, message),
 * its entry removed and its completion released; any other failure comes
 * before librbd has the call. */
static PyObject *start_buffer(PyObject *fast, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) {
        PyErr_SetString(PyExc_TypeError, "start_buffer(name, offset, buffer, writable, future, pending)");
        return NULL;
    }
    PyObject *name = args[0], *pending = args[5];
    const calls_t c = *bound_calls(PyTuple_GET_ITEM(fast, 0));
    PyObject *addr = PyDict_GetItemWithError(PyTuple_GET_ITEM(fast, 1), name);
    if (addr == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, name);
        return NULL;
    }
    io_fn io = (io_fn)PyLong_AsVoidPtr(addr);
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[1]);
    int writable = PyObject_IsTrue(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *pin = PyMemoryView_FromObject(args[2]);
    if (pin == NULL)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(pin, &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        Py_DECREF(pin);
        return NULL;
    }
    /* (the view's export is the pin's own: the buffer stays where it is while
     * the pin lives, so view.buf is good after this view is released) */
    void *buf = view.buf;
    size_t len = (size_t)view.len;
    PyBuffer_Release(&view);
    PyObject *report = PyLong_FromSsize_t(writable ? (Py_ssize_t)len : 0);
    PyObject *entry = report == NULL ? NULL : PyTuple_New(3);
    if (entry == NULL) {
        Py_XDECREF(report);
        Py_DECREF(pin);
        return NULL;
    }
    Py_INCREF(args[4]);
    PyTuple_SET_ITEM(entry, 0, args[4]);
    PyTuple_SET_ITEM(entry, 1, pin);      /* (the entry holds it) */
    PyTuple_SET_ITEM(entry, 2, report);
    void *comp = NULL;
    /* (with the GIL: an allocation, no lock a librbd thread could hold while
     * it waits for the GIL, and one hand-off per call is enough) */
    int ret = c.create(NULL, NULL, &comp);
    if (ret < 0) {
        Py_DECREF(entry);
        return fail(fast, ret, "create_completion");
    }
    PyObject *key = PyLong_FromVoidPtr(comp);
    if (key == NULL || PyObject_SetItem(pending, key, entry) < 0) {
        Py_XDECREF(key);
        Py_DECREF(entry);
        c.release(comp);
        return NULL;
    }
    Py_DECREF(entry);   /* (pending holds it) */
    Py_BEGIN_ALLOW_THREADS
    ret = io(c.image, offset, len, buf, comp);
    if (ret < 0)
        c.release(comp);
    Py_END_ALLOW_THREADS
    if (ret >= 0) {
        Py_DECREF(key);
        Py_RETURN_NONE;
    }
    /* refused: the entry goes (taking the pin) and the error is raised */
    if (PyObject_DelItem(pending, key) < 0)
        PyErr_Clear();   /* (the key was just set: nothing else can have taken it) */
    Py_DECREF(key);
    return fail(fast, ret, PyUnicode_AsUTF8(name));
}

/* Signal the image's eventfd: the loop collects again at its next turn. */
static void wake(int fd) {
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0) {
        /* (EAGAIN: an eventfd at its limit is readable already) */
    }
}

/* collect(), bound to an image's calls by collector(): the eventfd read,
 * then [(completion address, return value)] of every finished call, each
 * completion released once its item is in the list. One that cannot be
 * handed over (out of memory) stays unreleased in the image's carry, the
 * eventfd is signalled so that the loop collects again, and what was handed
 * over is returned: no finished call is lost, and no buffer is let go
 * before its call's entry is. */
static PyObject *collect(PyObject *bound, PyObject *unused) {
    const calls_t c = *bound_calls(bound);
    carry_t *carry = c.carry;
    uint64_t events;
    if (c.fd >= 0 && read(c.fd, &events, sizeof events) < 0) {
        /* (EAGAIN: nothing signalled since the last read) */
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        wake(c.fd);
        return NULL;
    }
    void *comps[BATCH];
    ssize_t rets[BATCH];
    int got, asked, polled, done;
    do {
        got = (int)carry->n;
        asked = BATCH - got;
        memcpy(comps, carry->comps, (size_t)got * sizeof(void *));
        Py_BEGIN_ALLOW_THREADS
        polled = c.poll(c.image, comps + got, asked);
        if (polled > 0)
            got += polled;
        for (int i = 0; i < got; i++)
            rets[i] = c.value(comps[i]);
        Py_END_ALLOW_THREADS
        for (done = 0; done < got; done++) {
            PyObject *key = PyLong_FromVoidPtr(comps[done]);
            PyObject *ret = key == NULL ? NULL : PyLong_FromSsize_t((Py_ssize_t)rets[done]);
            PyObject *item = ret == NULL ? NULL : PyTuple_New(2);
            if (item == NULL) {
                Py_XDECREF(key);
                Py_XDECREF(ret);
                break;
            }
            PyTuple_SET_ITEM(item, 0, key);
            PyTuple_SET_ITEM(item, 1, ret);
            if (PyList_Append(out, item) < 0) {
                Py_DECREF(item);
                break;
            }
            Py_DECREF(item);
        }
        if (done > 0) {
            Py_BEGIN_ALLOW_THREADS
            for (int i = 0; i < done; i++)
                c.release(comps[i]);
            Py_END_ALLOW_THREADS
        }
        carry->n = got - done;
        memmove(carry->comps, comps + done, (size_t)carry->n * sizeof(void *));
        if (done < got) {   /* (out of memory: the rest at the loop's next wake-up) */
            PyErr_Clear();
            wake(c.fd);
            return out;
        }
    } while (polled == asked);
    return out;
}

static PyMethodDef start_def = {
    "start_buffer", (PyCFunction)(void (*)(void))start_buffer, METH_FASTCALL,
    "start_buffer(name, offset, buffer, writable, future, pending)"};

/* starter(fast): start_buffer bound to fast = (calls, {name: address}, the
 * error class), as a method is bound to its object: no functools.partial
 * (whose call of seven arguments allocates them an array) per command. */
static PyObject *starter(PyObject *mod, PyObject *fast) {
    if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != 3 || !PyDict_Check(PyTuple_GET_ITEM(fast, 1))) {
        PyErr_SetString(PyExc_TypeError, "starter((calls, ios, error))");
        return NULL;
    }
    PyObject *calls = bind_calls(PyTuple_GET_ITEM(fast, 0));
    if (calls == NULL)
        return NULL;
    PyObject *self = PyTuple_Pack(3, calls, PyTuple_GET_ITEM(fast, 1), PyTuple_GET_ITEM(fast, 2));
    Py_DECREF(calls);
    if (self == NULL)
        return NULL;
    PyObject *fn = PyCFunction_NewEx(&start_def, self, NULL);
    Py_DECREF(self);
    return fn;
}

static PyMethodDef collect_def = {"collect", collect, METH_NOARGS, "collect()"};

/* collector(calls): collect bound to the image's calls, as starter() binds
 * start_buffer: Image.poll with no Python frame per eventfd wake-up. */
static PyObject *collector(PyObject *mod, PyObject *calls) {
    PyObject *bound = bind_calls(calls);
    if (bound == NULL)
        return NULL;
    PyObject *fn = PyCFunction_NewEx(&collect_def, bound, NULL);
    Py_DECREF(bound);
    return fn;
}

static PyMethodDef methods[] = {
    {"starter", starter, METH_O, "starter((calls, ios, error)) -> start_buffer"},
    {"collector", collector, METH_O, "collector(calls) -> collect"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "backends._rbdaio", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rbdaio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "CARRY_BYTES", (long)sizeof(carry_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
