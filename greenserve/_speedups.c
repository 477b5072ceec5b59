/* greenserve._speedups: page-aligned slots for CPython's frame data-stack chunks.
 *
 * Since 3.11 every thread state, and so every greenlet (greenlet saves and restores
 * tstate->datastack_*), keeps its Python frames in 16 KiB "chunks" that CPython takes from
 * the object arena allocator.  The default one mmaps each chunk and munmaps it when the
 * greenlet ends: a connection served by a new greenlet pays an mmap, a first-touch page
 * fault and an munmap.  This shim, installed with the public PyObject_SetArenaAllocator,
 * serves requests of exactly one chunk from a free list of slots carved out of one large
 * reservation; every other request (pymalloc's arenas, bigger chunks) goes to the allocator
 * it replaced.  The policy (when to install, probing the interpreter, what to refuse)
 * lives in greenserve/speedups.py; this file is only the mechanism.
 *
 * - Slots are page-aligned and never shared with anything else, so a suspended greenlet
 *   costs the pages it touched (usually the first one), as with mmap.
 * - Memory goes back: at most `keep` free slots stay resident (LIFO, the warmest reused
 *   first); a slot freed beyond that is madvise(MADV_DONTNEED)'d, so after a burst RSS
 *   returns near its level before it.  The reservation itself is only address space.
 * - The end of a burst is also when glibc's heap holds the most freed memory (greenlet
 *   stack copies, sockets, buffers) that it does not give back by itself: when the slots
 *   in use fall to a quarter of their peak (>= TRIM_MIN_PEAK), the shim calls
 *   malloc_trim(0) once (a few ms), unless activated with trim_heap off.
 * - Callers hold the GIL in 3.11, except that PyThreadState_Delete (documented as not
 *   needing it: embedders, shutdown) frees a thread's chunks: so we take our own mutex
 *   and do not rely on the GIL.  It is never held across a call to the original allocator.
 * - Whoever frees a chunk calls the arena allocator installed *at that moment* (CPython and
 *   greenlet both read it at free time): so the shim cannot simply step aside while its
 *   slots are alive.  deactivate() with slots in use leaves it in the chain, handing out
 *   nothing ("draining"); it takes its slots back and unmaps everything after the last.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

/* CPython's DATA_STACK_CHUNK_SIZE (3.11-3.13).  Not trusted: speedups.py observes the size
 * a new greenlet asks for before activating, and refuses if it differs. */
#define SLOT_SIZE ((size_t)16 * 1024)
/* Make the reservation writable 1 MiB at a time: commit charge grows with use only. */
#define COMMIT_SLOTS 64u
/* Address space only (PROT_NONE): 262,144 slots.  Smaller if the system refuses. */
#define MAX_RESERVE ((size_t)4 << 30)
#define MIN_RESERVE ((size_t)64 << 20)
#define MAX_EVENTS 256
/* A burst worth trimming glibc's heap after: this many greenlets alive at once. */
#define TRIM_MIN_PEAK 256u

#if PY_VERSION_HEX < 0x030B0000
#define UNSUPPORTED "Python < 3.11 has no frame data stack"
#elif defined(Py_GIL_DISABLED)
#define UNSUPPORTED "free-threaded build: the shim is not written for it"
#else
#define UNSUPPORTED ""
#endif

enum mode { OFF, OBSERVE, ACTIVE, DRAINING };
static const char *const MODE_NAMES[] = {"off", "observe", "active", "draining"};

struct event {
    char kind; /* 'a'lloc or 'f'ree */
    void *ptr;
    size_t size;
};

static struct {
    pthread_mutex_t lock;
    enum mode mode; /* written under the lock; read without it only to skip work */
    PyObjectArenaAllocator orig;
    char *base;        /* the reservation, NULL when there is none */
    size_t reserved;   /* its length */
    uint32_t *free_idx; /* warm free slots grow up from 0, returned ones down from cap-1 */
    uint32_t cap, committed, carved, warm, cold, in_use, keep;
    uint32_t peak; /* of in_use, since the last heap trim */
    int trim_heap;
    unsigned long long handed_out, overflow, returned_bytes, passed_through, heap_trims;
    struct event events[MAX_EVENTS];
    unsigned n_events, dropped_events;
} S = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void *shim_alloc(void *ctx, size_t size);
static void shim_free(void *ctx, void *ptr, size_t size);
static PyObjectArenaAllocator OURS = {NULL, shim_alloc, shim_free};

static enum mode
mode_now(void)
{
    return __atomic_load_n(&S.mode, __ATOMIC_RELAXED);
}

static void
set_mode(enum mode mode) /* lock held */
{
    __atomic_store_n(&S.mode, mode, __ATOMIC_RELAXED);
}

static void
record(char kind, void *ptr, size_t size)
{
    pthread_mutex_lock(&S.lock);
    if (S.mode == OBSERVE) {
        if (S.n_events < MAX_EVENTS)
            S.events[S.n_events++] = (struct event){kind, ptr, size};
        else
            S.dropped_events++;
    }
    pthread_mutex_unlock(&S.lock);
}

/* A free slot (lock held), or NULL when the reservation is exhausted. */
static void *
take_slot(void)
{
    uint32_t i;
    if (S.warm) {
        i = S.free_idx[--S.warm];
    } else if (S.cold) {
        i = S.free_idx[S.cap - S.cold--];
    } else {
        if (S.carved == S.committed) {
            uint32_t n = S.cap - S.committed < COMMIT_SLOTS ? S.cap - S.committed : COMMIT_SLOTS;
            if (n == 0 || mprotect(S.base + (size_t)S.committed * SLOT_SIZE, n * SLOT_SIZE,
                                   PROT_READ | PROT_WRITE) != 0)
                return NULL;
            S.committed += n;
        }
        i = S.carved++;
    }
    if (++S.in_use > S.peak)
        S.peak = S.in_use;
    S.handed_out++;
    return S.base + (size_t)i * SLOT_SIZE;
}

static void
return_to_os(char *slot)
{
    /* MADV_DONTNEED, not MADV_FREE: RSS must drop now, not under memory pressure. */
    madvise(slot, SLOT_SIZE, MADV_DONTNEED);
    S.returned_bytes += SLOT_SIZE;
}

/* Returns resident free slots to the OS until `left` remain (lock held). */
static void
return_warm(uint32_t left)
{
    while (S.warm > left) {
        uint32_t i = S.free_idx[--S.warm];
        return_to_os(S.base + (size_t)i * SLOT_SIZE);
        S.free_idx[S.cap - 1 - S.cold++] = i;
    }
}

static void
release_reservation(void)
{
    munmap(S.base, S.reserved);
    munmap(S.free_idx, (size_t)S.cap * sizeof(uint32_t));
    S.base = NULL;
    S.free_idx = NULL;
    S.reserved = S.cap = S.committed = S.carved = S.warm = S.cold = 0;
}

/* Takes a slot back (lock held); whether glibc's heap should be trimmed now. */
static int
give_back(char *p)
{
    size_t off = (size_t)(p - S.base);
    if (off % SLOT_SIZE || off / SLOT_SIZE >= S.carved)
        Py_FatalError("greenserve._speedups: freeing an address that is no slot");
    S.in_use--;
    if (S.mode != DRAINING && S.warm < S.keep) {
        S.free_idx[S.warm++] = (uint32_t)(off / SLOT_SIZE);
    } else {
        return_to_os(p);
        S.free_idx[S.cap - 1 - S.cold++] = (uint32_t)(off / SLOT_SIZE);
    }
    if (S.mode == DRAINING && S.in_use == 0)
        release_reservation(); /* stays in the chain, as a pass-through */
    if (S.trim_heap && S.peak >= TRIM_MIN_PEAK && S.in_use <= S.peak / 4) {
        S.peak = S.in_use; /* the next trim waits for the next burst's end */
        return 1;
    }
    return 0;
}

static void
trim_heap(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
    __atomic_fetch_add(&S.heap_trims, 1, __ATOMIC_RELAXED);
#endif
}

static void *
shim_alloc(void *ctx, size_t size)
{
    (void)ctx;
    if (size == SLOT_SIZE && mode_now() == ACTIVE) {
        void *p = NULL;
        pthread_mutex_lock(&S.lock);
        if (S.mode == ACTIVE && (p = take_slot()) == NULL)
            S.overflow++; /* reservation full: the original allocator serves it */
        pthread_mutex_unlock(&S.lock);
        if (p != NULL)
            return p;
    }
    void *p = S.orig.alloc(S.orig.ctx, size);
    __atomic_fetch_add(&S.passed_through, 1, __ATOMIC_RELAXED);
    if (mode_now() == OBSERVE)
        record('a', p, size);
    return p;
}

static void
shim_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (size == SLOT_SIZE) {
        int trim = 0;
        pthread_mutex_lock(&S.lock);
        int ours = S.base != NULL && (char *)ptr >= S.base && (char *)ptr < S.base + S.reserved;
        if (ours)
            trim = give_back(ptr);
        pthread_mutex_unlock(&S.lock);
        if (trim)
            trim_heap(); /* not under our lock: it takes glibc's */
        if (ours)
            return;
    }
    S.orig.free(S.orig.ctx, ptr, size);
    if (mode_now() == OBSERVE)
        record('f', ptr, size);
}

static int
is_ours_current(void)
{
    PyObjectArenaAllocator now;
    PyObject_GetArenaAllocator(&now);
    return now.alloc == shim_alloc && now.free == shim_free;
}

/* ------------------------------------------------------------------ module functions */

/* Puts the shim in front of the current arena allocator (lock held, mode OFF). */
static void
enter_chain(enum mode mode)
{
    PyObject_GetArenaAllocator(&S.orig);
    set_mode(mode);
    PyObject_SetArenaAllocator(&OURS);
}

static PyObject *
observe(PyObject *m, PyObject *unused)
{
    (void)m, (void)unused;
    if (UNSUPPORTED[0]) {
        PyErr_SetString(PyExc_RuntimeError, UNSUPPORTED);
        return NULL;
    }
    pthread_mutex_lock(&S.lock);
    if (S.mode != OFF) {
        pthread_mutex_unlock(&S.lock);
        PyErr_SetString(PyExc_RuntimeError, "the shim is already in the allocator chain");
        return NULL;
    }
    S.n_events = S.dropped_events = 0;
    enter_chain(OBSERVE);
    pthread_mutex_unlock(&S.lock);
    Py_RETURN_NONE;
}

static PyObject *
events(PyObject *m, PyObject *unused)
{
    (void)m, (void)unused;
    struct event copy[MAX_EVENTS];
    pthread_mutex_lock(&S.lock);
    unsigned n = S.n_events, dropped = S.dropped_events;
    memcpy(copy, S.events, n * sizeof(struct event));
    S.n_events = S.dropped_events = 0;
    pthread_mutex_unlock(&S.lock);
    PyObject *list = PyList_New(0);
    for (unsigned i = 0; list != NULL && i < n; i++) {
        PyObject *item = Py_BuildValue("(sKn)", copy[i].kind == 'a' ? "alloc" : "free",
                                       (unsigned long long)(uintptr_t)copy[i].ptr,
                                       (Py_ssize_t)copy[i].size);
        if (item == NULL || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list == NULL ? NULL : Py_BuildValue("(NI)", list, dropped);
}

static PyObject *
current_chunk(PyObject *m, PyObject *unused)
{
    (void)m, (void)unused;
#if PY_VERSION_HEX >= 0x030B0000
    /* Only the pointer: its size is what the allocator was asked for (seen by observe). */
    return PyLong_FromVoidPtr((void *)PyThreadState_Get()->datastack_chunk);
#else
    Py_RETURN_NONE;
#endif
}

static int
reserve(void)
{
    for (size_t len = MAX_RESERVE; len >= MIN_RESERVE; len /= 2) {
        void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            continue;
        uint32_t cap = (uint32_t)(len / SLOT_SIZE);
        void *idx = mmap(NULL, (size_t)cap * sizeof(uint32_t), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (idx == MAP_FAILED) {
            munmap(p, len);
            continue;
        }
#ifdef MADV_NOHUGEPAGE
        /* A huge page would make a greenlet's first touch cost 2 MiB of RSS, not 4 KiB. */
        madvise(p, len, MADV_NOHUGEPAGE);
#endif
        S.base = p, S.reserved = len, S.free_idx = idx, S.cap = cap;
        return 0;
    }
    return -1;
}

static PyObject *
activate(PyObject *m, PyObject *args)
{
    (void)m;
    Py_ssize_t keep;
    int heap;
    if (!PyArg_ParseTuple(args, "np:activate", &keep, &heap))
        return NULL;
    if (keep < 0 || (size_t)keep > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "keep must be a slot count >= 0");
        return NULL;
    }
    pthread_mutex_lock(&S.lock);
    const char *error = NULL;
    if (UNSUPPORTED[0])
        error = UNSUPPORTED;
    else if (S.base == NULL && reserve() != 0)
        error = "could not reserve address space for the slots";
    if (error == NULL) {
        if (S.mode == OFF) /* installed before (probed), then removed: back in front */
            enter_chain(ACTIVE);
        S.keep = (uint32_t)keep;
        S.trim_heap = heap;
        return_warm(S.keep); /* a lower keep applies now, not at the next free */
        set_mode(ACTIVE);
    }
    pthread_mutex_unlock(&S.lock);
    if (error) {
        PyErr_SetString(PyExc_RuntimeError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
trim(PyObject *m, PyObject *unused)
{
    (void)m, (void)unused;
    pthread_mutex_lock(&S.lock);
    unsigned long long before = S.returned_bytes;
    return_warm(0);
    unsigned long long returned = S.returned_bytes - before;
    pthread_mutex_unlock(&S.lock);
    trim_heap();
    return PyLong_FromUnsignedLongLong(returned);
}

static PyObject *
deactivate(PyObject *m, PyObject *unused)
{
    (void)m, (void)unused;
    pthread_mutex_lock(&S.lock);
    PyObject *result = Py_True;
    if (S.mode == OFF) {
        /* nothing to do */
    } else if (!is_ours_current()) {
        result = NULL; /* someone installed an allocator over ours: removing ours drops it */
    } else if (S.in_use == 0) {
        PyObject_SetArenaAllocator(&S.orig);
        if (S.base)
            release_reservation();
        set_mode(OFF);
    } else {
        set_mode(DRAINING);
        return_warm(0);
        result = Py_False;
    }
    pthread_mutex_unlock(&S.lock);
    if (result == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "another arena allocator was installed over greenserve's: "
                        "remove it first");
        return NULL;
    }
    return Py_NewRef(result);
}

static PyObject *
owns(PyObject *m, PyObject *arg)
{
    (void)m;
    char *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&S.lock);
    int ours = S.base != NULL && p >= S.base && p < S.base + S.reserved;
    pthread_mutex_unlock(&S.lock);
    return PyBool_FromLong(ours);
}

static PyObject *
stats(PyObject *m, PyObject *unused)
{
    (void)m, (void)unused;
    pthread_mutex_lock(&S.lock);
    PyObject *d = Py_BuildValue(
        "{s:s,s:n,s:I,s:I,s:I,s:I,s:I,s:n,s:n,s:K,s:K,s:K,s:K,s:K}",
        "mode", MODE_NAMES[S.mode], "slot_size", (Py_ssize_t)SLOT_SIZE, "keep", S.keep,
        "slots_in_use", S.in_use, "slots_free_resident", S.warm, "slots_free_returned", S.cold,
        "slots_carved", S.carved, "bytes_reserved", (Py_ssize_t)S.reserved,
        "bytes_committed", (Py_ssize_t)((size_t)S.committed * SLOT_SIZE),
        "bytes_returned", S.returned_bytes, "slots_handed_out", S.handed_out,
        "overflow", S.overflow,
        "passed_through", __atomic_load_n(&S.passed_through, __ATOMIC_RELAXED),
        "heap_trims", __atomic_load_n(&S.heap_trims, __ATOMIC_RELAXED));
    pthread_mutex_unlock(&S.lock);
    return d;
}

static PyMethodDef METHODS[] = {
    {"observe", observe, METH_NOARGS,
     "Put the shim in the allocator chain, passing everything through and recording it."},
    {"events", events, METH_NOARGS,
     "([(kind, address, size), ...], dropped) recorded since observe() or the last call."},
    {"current_chunk", current_chunk, METH_NOARGS,
     "Address of the running thread state's current frame data-stack chunk."},
    {"activate", activate, METH_VARARGS,
     "activate(keep, trim_heap): hand out slots (entering the allocator chain if need be)."},
    {"deactivate", deactivate, METH_NOARGS,
     "Stop handing out slots; True if removed, False if draining (slots still in use)."},
    {"trim", trim, METH_NOARGS,
     "Return every free slot's memory (and glibc's free heap) now; the slot bytes returned."},
    {"owns", owns, METH_O, "Whether an address lies in the slots' reservation."},
    {"stats", stats, METH_NOARGS, "The shim's counters, as a dict."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT,
    .m_name = "greenserve._speedups",
    .m_doc = "Page-aligned slots for frame data-stack chunks (see greenserve.speedups).",
    .m_size = -1, /* its state is the process's allocator: one per process, not per module */
    .m_methods = METHODS,
};

/* A fork while another thread holds the lock (a GIL-less free) would leave it locked in
 * the child: hold it across fork instead. */
static void before_fork(void) { pthread_mutex_lock(&S.lock); }
static void after_fork(void) { pthread_mutex_unlock(&S.lock); }

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&MODULE);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SLOT_SIZE", (long)SLOT_SIZE) < 0 ||
        PyModule_AddStringConstant(m, "UNSUPPORTED", UNSUPPORTED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    static int registered;
    if (!registered && pthread_atfork(before_fork, after_fork, after_fork) == 0)
        registered = 1;
    return m;
}
