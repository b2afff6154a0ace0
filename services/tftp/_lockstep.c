/*
 * The lock-step inner loop of a TFTP read transfer, in C and without the GIL.
 *
 * Why C: across vCPUs a lock-step block is two wake-ups, and a Python thread's own
 * share of each (the interpreter's memory, cold again after every wake-up) kept the
 * Python loop about 5% behind tftpd-hpa there (docs/benchmarks.md, TFTP). This loop
 * does per block what services/tftp/session.py does around ReadTransfer.on_ack_fast,
 * and nothing else: recv, the same checks as on_ack_fast, one preadv per batch of
 * packet slots, a clock read, send. Everything it does not take (any other datagram,
 * the end of the fast range, a timeout, an error, a file that shrank) it hands back
 * untouched, with the state reached, and ReadTransfer decides as before; a test runs
 * both against the same ACK sequences and requires the same packets and state.
 *
 * run(sock, fd, slots, count, blksize, sent, below, first, loaded, ack, rearm_us)
 *   sock     connected datagram socket, blocking (SO_RCVTIMEO is the timer)
 *   fd       the file, read with preadv
 *   slots    writable buffer of `count` packets of 4 + blksize bytes (ReadAhead's),
 *            the opcode already in place; `first` is the block in slot 0 and
 *            `loaded` how many slots hold blocks
 *   sent     the block sent last (lock-step: the one whose ACK is awaited)
 *   below    ACKs are taken while sent < below (the next block is a full one)
 *   ack      writable buffer the datagrams are received into
 *   rearm_us SO_RCVTIMEO to set once the first ACK is taken (0: leave it)
 * returns (status, sent, first, loaded, length, when):
 *   status   DECLINED (ack[:length] is a datagram not taken), TIMED_OUT, SHORT_READ
 *            (the file no longer holds block sent + 1), or -errno
 *   when     CLOCK_MONOTONIC seconds at the last ACK taken (time.monotonic's clock)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>

#define MAX_SLOTS 64
#define OP_ACK 4

enum { DECLINED = 0, TIMED_OUT = 1, SHORT_READ = 2 };

static PyObject *
lockstep_run(PyObject *module, PyObject *args)
{
    int sock, fd;
    Py_buffer slots, ack;
    Py_ssize_t count, blksize;
    long long sent, below, first, loaded, rearm_us;
    (void)module;
    if (!PyArg_ParseTuple(args, "iiw*nnLLLLw*L", &sock, &fd, &slots, &count, &blksize,
                          &sent, &below, &first, &loaded, &ack, &rearm_us))
        return NULL;
    Py_ssize_t slot = blksize + 4;
    if (count < 1 || count > MAX_SLOTS || blksize < 8 || blksize > 65464 ||
        slots.len < count * slot || ack.len < 4 || loaded < 0 || loaded > count ||
        sent < 0 || rearm_us < 0) {
        PyBuffer_Release(&slots);
        PyBuffer_Release(&ack);
        PyErr_SetString(PyExc_ValueError, "lockstep.run: inconsistent arguments");
        return NULL;
    }
    unsigned char *buf = slots.buf, *a = ack.buf;
    struct iovec iov[MAX_SLOTS];
    for (Py_ssize_t k = 0; k < count; k++) {
        iov[k].iov_base = buf + k * slot + 4;
        iov[k].iov_len = (size_t)blksize;
    }
    int status = DECLINED;
    ssize_t n = 0;
    double when = 0.0;
    struct timespec ts;

    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        n = recv(sock, a, (size_t)ack.len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            status = (errno == EAGAIN || errno == EWOULDBLOCK) ? TIMED_OUT : -errno;
            n = 0;
            break;
        }
        /* on_ack_fast's test: a 4-byte ACK of the block just sent, a full block next */
        if (n != 4 || sent >= below || a[0] != 0 || a[1] != OP_ACK ||
            (((unsigned)a[2] << 8) | a[3]) != (unsigned)(sent & 0xFFFF)) {
            status = DECLINED;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &ts);
        when = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        long long next = sent + 1;
        long long i = next - first;
        sent = next; /* as on_ack_fast: the ACK is recorded before anything can fail */
        if (rearm_us) {  /* the first ACK after a resend: the plain timeout again */
            struct timeval tv = {(time_t)(rearm_us / 1000000), (suseconds_t)(rearm_us % 1000000)};
            if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
                status = -errno;
                break;
            }
            rearm_us = 0;
        }
        if (i < 0 || i >= loaded) {
            ssize_t got;
            do
                got = preadv(fd, iov, (int)count, (off_t)(next - 1) * blksize);
            while (got < 0 && errno == EINTR);
            if (got < 0) {
                status = -errno;
                break;
            }
            first = next;
            loaded = got / blksize;
            if (loaded > count)
                loaded = count;
            if (loaded == 0) {
                status = SHORT_READ;
                break;
            }
            for (long long k = 0; k < loaded; k++) {
                unsigned char *p = buf + k * slot;
                p[2] = (unsigned char)((next + k) >> 8 & 0xFF);
                p[3] = (unsigned char)((next + k) & 0xFF);
            }
            i = 0;
        }
        ssize_t w;
        do
            w = send(sock, buf + i * slot, (size_t)slot, 0);
        while (w < 0 && errno == EINTR);
        if (w < 0) {
            status = -errno;
            break;
        }
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&slots);
    PyBuffer_Release(&ack);
    return Py_BuildValue("iLLLnd", status, sent, first, loaded, (Py_ssize_t)n, when);
}

static PyMethodDef methods[] = {
    {"run", lockstep_run, METH_VARARGS,
     "Take in-order lock-step ACKs and send the next blocks until something else comes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "services.tftp._lockstep",
    "The lock-step inner loop of a TFTP read transfer (see services/tftp/session.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__lockstep(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "DECLINED", DECLINED) < 0 ||
        PyModule_AddIntConstant(m, "TIMED_OUT", TIMED_OUT) < 0 ||
        PyModule_AddIntConstant(m, "SHORT_READ", SHORT_READ) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", MAX_SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
