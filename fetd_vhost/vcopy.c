/* fetd_vhost._vcopy: the compiled build's copy between one contiguous buffer
 * and a request's guest buffers (decisions 0313, 0314), and the walk of an
 * indirect descriptor table into those buffers (decision 0315, `table`
 * below).
 *
 * A request's buffers are runs of guest memory: three int64s per run (region
 * index, offset in that region, length), as the descriptor walk made them:
 * a flat list of ints, or from `table` an array('q') when there are more than
 * a few (decision 0316: no Python int per run); `regions` is the memory
 * table's list of region buffers.
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
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
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

/* The runs to plan from: a list of ints, or a buffer of int64s (array('q')). */
typedef struct {
    PyObject *list;
    Py_buffer packed;   /* held when list is NULL */
    Py_ssize_t n;       /* ints */
} Runs;

static int
runs_open(PyObject *obj, Runs *r)
{
    if (PyList_Check(obj)) {
        r->list = obj;
        r->n = PyList_GET_SIZE(obj);
        return 0;
    }
    r->list = NULL;
    if (PyObject_GetBuffer(obj, &r->packed, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (r->packed.itemsize != 8 || r->packed.format == NULL || strcmp(r->packed.format, "q") != 0) {
        PyBuffer_Release(&r->packed);
        PyErr_SetString(PyExc_TypeError, "runs must be a list of ints or an array('q')");
        return -1;
    }
    r->n = r->packed.len / 8;
    return 0;
}

static void
runs_close(Runs *r)
{
    if (r->list == NULL)
        PyBuffer_Release(&r->packed);
}

/* An int of the runs (an int itself: no __index__ runs Python code mid-plan). */
static int
field(const Runs *runs, Py_ssize_t i, Py_ssize_t *out)
{
    if (runs->list == NULL) {
        int64_t v;
        memcpy(&v, (const char *)runs->packed.buf + 8 * i, 8);
        *out = (Py_ssize_t)v;
        return 0;
    }
    PyObject *item = PyList_GET_ITEM(runs->list, i);
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
plan(PyObject *regions, const Runs *runs, Py_ssize_t offset, Py_ssize_t want, int flags, Plan *p)
{
    memset(p, 0, sizeof *p);
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return -1;
    }
    Py_ssize_t n = runs->n;
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

/* One copy between a flat buffer and the runs: `fmt` parses the flat buffer
   as read-only (scatter: into guest memory) or writable (gather: out of it). */
static PyObject *
move(PyObject *args, const char *fmt, int guest_flags, int into)
{
    Py_buffer flat;
    PyObject *regions, *obj;
    Py_ssize_t offset;
    Runs runs;
    Plan p;
    if (!PyArg_ParseTuple(args, fmt, &flat, &PyList_Type, &regions, &obj, &offset))
        return NULL;
    if (runs_open(obj, &runs) < 0) {
        PyBuffer_Release(&flat);
        return NULL;
    }
    if (plan(regions, &runs, offset, flat.len, guest_flags, &p) < 0) {
        runs_close(&runs);
        PyBuffer_Release(&flat);
        return NULL;
    }
    copy(&p, flat.buf, into);
    Py_ssize_t done = p.total;
    unplan(&p);
    runs_close(&runs);
    PyBuffer_Release(&flat);
    return PyLong_FromSsize_t(done);
}

static PyObject *
scatter(PyObject *self, PyObject *args)
{
    return move(args, "y*O!On:scatter", PyBUF_WRITABLE, 1);
}

static PyObject *
gather(PyObject *self, PyObject *args)
{
    return move(args, "w*O!On:gather", PyBUF_SIMPLE, 0);
}


/* ---------------------------------------------------------------- an indirect table's chain */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_TABLE_REGIONS 64    /* more than VHOST_MEMORY_MAX_NREGIONS (8) */

typedef unsigned __int128 u128;

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
} Desc;                         /* virtq_desc, little-endian as x86 reads it */

typedef struct {
    uint64_t start[MAX_TABLE_REGIONS];
    u128 end[MAX_TABLE_REGIONS];
    Py_ssize_t n;
} Table;

/* A broken chain: ValueError with Python's message (printf: %llx wanted). */
static void
chain_error(const char *fmt, ...)
{
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PyErr_SetString(PyExc_ValueError, msg);
}

/* A direction's runs while the table is walked: int64s, three per run, made
 * into one array('q') at the end (decision 0316). */
typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
    int64_t first[3 * 8];   /* most chains: no allocation */
} Packed;

static PyObject *array_type;    /* array.array */

static int
append3(Packed *runs, Py_ssize_t a, unsigned long long b, unsigned long long c)
{
    if (b > INT64_MAX || c > INT64_MAX) {
        chain_error("run 0x%llx+%llu does not fit", b, c);
        return -1;
    }
    if (runs->n + 3 > runs->cap) {
        Py_ssize_t cap = runs->cap * 2;
        int64_t *v = PyMem_Malloc((size_t)cap * sizeof *v);
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(v, runs->v, (size_t)runs->n * sizeof *v);
        if (runs->v != runs->first)
            PyMem_Free(runs->v);
        runs->v = v;
        runs->cap = cap;
    }
    runs->v[runs->n++] = a;
    runs->v[runs->n++] = (int64_t)b;
    runs->v[runs->n++] = (int64_t)c;
    return 0;
}

static void
packed_init(Packed *runs)
{
    runs->v = runs->first;
    runs->n = 0;
    runs->cap = 3 * 8;
}

static void
packed_free(Packed *runs)
{
    if (runs->v != runs->first)
        PyMem_Free(runs->v);
}

/* A direction's runs for Python: a list of ints while there are few (an
 * array costs a call of array.array, about what four runs' ints cost), else
 * one array('q') of them all. */
#define LIST_RUNS_MAX 4

static PyObject *
packed_result(const Packed *runs)
{
    if (runs->n > 3 * LIST_RUNS_MAX)
        return PyObject_CallFunction(array_type, "Cy#", 'q', (const char *)runs->v,
                                     runs->n * (Py_ssize_t)sizeof(int64_t));
    PyObject *list = PyList_New(runs->n);
    for (Py_ssize_t i = 0; list != NULL && i < runs->n; i++) {
        PyObject *v = PyLong_FromLongLong(runs->v[i]);
        if (v == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* GuestMemory.translate: [addr, addr+length) as runs appended to `runs`,
 * split where it crosses into the next region; the same refusals. */
static int
translate(const Table *t, Packed *runs, uint64_t addr, uint64_t length)
{
    if ((u128)addr + length > (u128)1 << 64) {
        chain_error("range 0x%llx+%llu wraps", (unsigned long long)addr, (unsigned long long)length);
        return -1;
    }
    while (length) {
        Py_ssize_t i = t->n - 1;          /* the last region starting at or below addr */
        while (i >= 0 && t->start[i] > addr)
            i--;
        if (i < 0 || addr >= t->end[i]) {
            chain_error("address 0x%llx is outside guest memory", (unsigned long long)addr);
            return -1;
        }
        u128 room = t->end[i] - addr;
        uint64_t n = room < length ? (uint64_t)room : length;
        if (append3(runs, i, addr - t->start[i], n) < 0)
            return -1;
        addr += n;
        length -= n;
    }
    return 0;
}

/* table(raw, starts, sizes) -> (readable, writable, readable_size, writable_size)
 * The chain an indirect table holds, walked as Virtqueue._walk walks it from
 * a head that is the table, with the same checks and messages (ValueError):
 * runs of adjacent buffers translated against the memory table (`starts`,
 * `sizes`: its regions' guest-physical ranges, in order). A direction of more
 * than a few runs comes back as one array('q'): no Python int per run (0316). */
static PyObject *
table(PyObject *self, PyObject *args)
{
    Py_buffer raw;
    PyObject *starts, *sizes;
    if (!PyArg_ParseTuple(args, "y*O!O!:table", &raw, &PyList_Type, &starts, &PyList_Type, &sizes))
        return NULL;
    PyObject *out = NULL;
    Packed readable, writable, *run;
    Table t;
    Py_ssize_t size = raw.len / (Py_ssize_t)sizeof(Desc), i = 0, steps = 0;
    uint64_t start = 0, done_bytes = 0, readable_size = 0;
    u128 end = 0;
    int seen_write = 0;
    packed_init(&readable);
    packed_init(&writable);
    t.n = PyList_GET_SIZE(starts);
    if (t.n > MAX_TABLE_REGIONS || PyList_GET_SIZE(sizes) != t.n) {
        PyErr_SetString(PyExc_ValueError, "a memory table of too many regions, or starts and sizes apart");
        goto done;
    }
    for (Py_ssize_t i = 0; i < t.n; i++) {
        t.start[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(starts, i));
        if (PyErr_Occurred())
            goto done;
        t.end[i] = (u128)t.start[i] + PyLong_AsUnsignedLongLong(PyList_GET_ITEM(sizes, i));
        if (PyErr_Occurred())
            goto done;
    }
    run = &readable;
    for (;;) {
        if (i >= size) {
            chain_error("next index %zd outside a table of %zd", i, size);
            goto done;
        }
        if (++steps > size) {
            chain_error("chain longer than its table (a loop?)");
            goto done;
        }
        Desc d;
        memcpy(&d, (const char *)raw.buf + i * (Py_ssize_t)sizeof(Desc), sizeof d);
        if (d.flags & DESC_F_INDIRECT) {
            chain_error("indirect descriptor not allowed here");
            goto done;
        }
        if (d.flags & DESC_F_WRITE) {
            if (!seen_write) {
                if (end != start && translate(&t, run, start, (uint64_t)(end - start)) < 0)
                    goto done;
                readable_size = done_bytes + (uint64_t)(end - start);
                done_bytes = 0;
                start = d.addr;
                end = d.addr;
                run = &writable;
                seen_write = 1;
            }
        } else if (seen_write) {
            chain_error("a device-readable buffer after a device-writable one");
            goto done;
        }
        if (d.addr != end) {
            if (end != start && translate(&t, run, start, (uint64_t)(end - start)) < 0)
                goto done;
            done_bytes += (uint64_t)(end - start);
            start = d.addr;
            end = d.addr;
        }
        end += d.len;
        if (!(d.flags & DESC_F_NEXT)) {
            if (end != start && translate(&t, run, start, (uint64_t)(end - start)) < 0)
                goto done;
            uint64_t last = done_bytes + (uint64_t)(end - start);
            PyObject *r = packed_result(&readable), *w = r ? packed_result(&writable) : NULL;
            if (w != NULL)
                out = Py_BuildValue("NNKK", r, w, (unsigned long long)(seen_write ? readable_size : last),
                                    (unsigned long long)(seen_write ? last : 0));
            else
                Py_XDECREF(r);
            goto done;
        }
        i = d.next;
    }
done:
    packed_free(&readable);
    packed_free(&writable);
    PyBuffer_Release(&raw);
    return out;
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, "Copy a buffer into guest memory runs from an offset on: bytes copied."},
    {"gather", gather, METH_VARARGS, "Copy guest memory runs from an offset on into a buffer: bytes copied."},
    {"table", table, METH_VARARGS, "The runs of the chain an indirect descriptor table holds (Virtqueue._walk's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fetd_vhost._vcopy",
    "fetd_vhost's copies between one buffer and a chain's guest memory runs, and an indirect table's walk "
    "(decisions 0313-0315).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__vcopy(void)
{
    if (array_type == NULL) {
        PyObject *array = PyImport_ImportModule("array");
        if (array == NULL)
            return NULL;
        array_type = PyObject_GetAttrString(array, "array");
        Py_DECREF(array);
        if (array_type == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
