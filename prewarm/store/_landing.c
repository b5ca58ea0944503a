/* The per-file work of landing a span, in C: what :mod:`prewarm.store.landing` drives.
 *
 * Why C: landing a span of a layer of small files is one header check and one file
 * creation per file (open, write, fchown, fchmod, futimens, close).  In Python that was
 * ~40 us of interpreter per file, the largest share of a cold pre-warm's CPU; here it is
 * the system calls alone, with the GIL released so a node's other threads go on.
 *
 * Both functions read the C records of a layer's *landing table* (prewarm.store.table),
 * built once per layer by ``prewarm.store.landing.build_table``: one fixed 96-byte record
 * per TOC entry (below) plus a heap of the names, link names and paths the records point
 * into.  Neither function decides anything the Python reference does not:
 * ``check_headers`` only ever says "verified" for a header chain that is one plain ustar or GNU block whose
 * every field equals the TOC entry's (possibly behind a PAX header holding only the
 * entry's path, as Go writes long names), and hands everything else back to the Python
 * checker (which also words the errors); ``write_pieces`` hands back the pieces it
 * does not take (files with xattrs) and reports failures as codes that the Python
 * side turns into the same exceptions as its own writer.
 *
 * ``build_table`` builds those records (the same bytes as the Python builder, which takes
 * over, and words the errors, for any entry C does not take as plainly).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

/* Keep in step with landing.RECORD (struct "<7q8I2B6x"). */
typedef struct {
    int64_t data_start;   /* where the entry's data starts in the tar stream */
    int64_t header_start; /* where its header chain starts (end of the previous entry) */
    int64_t size;         /* TOC size */
    int64_t mode;
    int64_t devmajor;
    int64_t devminor;
    int64_t mtime_ns;     /* TOC mod_time, parsed */
    uint32_t uid, gid;
    uint32_t name_off, name_len;
    uint32_t link_off, link_len;
    uint32_t path_off, path_len; /* the entry's Placement path in the layer (write target) */
    uint8_t type;         /* tar type flag of the TOC type: '0'..'6' */
    uint8_t flags;
    uint8_t pad[6];
} record_t;

_Static_assert(sizeof(record_t) == 96, "landing record is 96 bytes");

enum {
    F_WRITE = 1,     /* final regular file with data: its bytes are written */
    F_BORN = 2,      /* created whole by the span that holds its data */
    F_CHECKABLE = 4, /* a one-block header chain can be compared with it here */
    F_CREATABLE = 8, /* born, and its metadata is plain (no xattrs): created here */
    F_PAX_PATH = 16, /* checkable, behind a PAX header whose one record is path=<name> */
    F_PLAIN = 32,    /* the record's uid, gid, mode and mtime are the entry's metadata */
};

enum {
    E_PARENT_MISSING = 1,
    E_PARENT_UNSAFE = 2,
    E_OPEN_DATA = 3,
    E_NOT_REGULAR = 4,
    E_IO = 5,
};

#define BLOCK 512
#define ALIGN 4096
/* mtimes whose nanoseconds fit an int64 (years 1678..2262); the Python side takes the rest. */
#define MIN_SECS (-9223372035LL)
#define MAX_SECS (9223372036LL)

/* ---------------------------------------------------------------- header checks */

/* A numeric field as plain octal, as Go's parseOctal takes the common case: spaces and
 * NULs trimmed on both sides, then only octal digits.  Anything else (base-256, an
 * inner NUL, digits 8/9, overflow) returns 0: the Python parser decides. */
static int plain_octal(const uint8_t *f, int n, int64_t *out) {
    int a = 0, b = n;
    while (a < b && (f[a] == ' ' || f[a] == 0)) a++;
    while (b > a && (f[b - 1] == ' ' || f[b - 1] == 0)) b--;
    if (b - a > 21) return 0;
    int64_t v = 0;
    for (int i = a; i < b; i++) {
        if (f[i] < '0' || f[i] > '7') return 0;
        v = (v << 3) | (f[i] - '0');
    }
    *out = v;
    return 1;
}

static size_t cstrlen(const uint8_t *p, size_t n) {
    const uint8_t *z = memchr(p, 0, n);
    return z ? (size_t)(z - p) : n;
}

/* The block's checksum is its unsigned sum (the signed one is rare: Python takes it). */
static int checksum_ok(const uint8_t *blk) {
    int64_t chk;
    if (!plain_octal(blk + 148, 8, &chk)) return 0;
    int64_t sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++)
        if (i < 148 || i >= 156) sum += blk[i];
    return chk == sum;
}

/* 1 when the block is one plain header whose fields all equal the record's (its name
 * too, unless `named` says a PAX path record already matched the TOC name). */
static int header_matches(const uint8_t *blk, const record_t *r, const char *heap, int named) {
    int64_t mode, uid, gid, size, mtime, dmaj, dmin;
    if (!checksum_ok(blk)) return 0;
    int ustar;
    if (memcmp(blk + 257, "ustar\0", 6) == 0) {
        if (memcmp(blk + 508, "tar\0", 4) == 0) return 0; /* STAR */
        ustar = 1;
    } else if (memcmp(blk + 257, "ustar ", 6) == 0 && blk[263] == ' ' && blk[264] == 0) {
        if (blk[345] || blk[357]) return 0; /* GNU atime/ctime (or an old prefix) */
        ustar = 0;
    } else {
        return 0;
    }
    if (blk[156] != r->type) return 0;
    if (!plain_octal(blk + 100, 8, &mode) || !plain_octal(blk + 108, 8, &uid) ||
        !plain_octal(blk + 116, 8, &gid) || !plain_octal(blk + 124, 12, &size) ||
        !plain_octal(blk + 136, 12, &mtime) || !plain_octal(blk + 329, 8, &dmaj) ||
        !plain_octal(blk + 337, 8, &dmin))
        return 0;
    if (mode != r->mode || (uint32_t)uid != r->uid || (uint32_t)gid != r->gid || size != r->size ||
        dmaj != r->devmajor || dmin != r->devminor)
        return 0;
    if (mtime < MIN_SECS || mtime >= MAX_SECS || mtime * 1000000000LL != r->mtime_ns) return 0;
    if (named) goto link;
    size_t nlen = cstrlen(blk, 100);
    size_t plen = ustar ? cstrlen(blk + 345, 155) : 0;
    const char *name = heap + r->name_off;
    if (plen) {
        if ((size_t)r->name_len != plen + 1 + nlen || memcmp(name, blk + 345, plen) != 0 ||
            name[plen] != '/' || memcmp(name + plen + 1, blk, nlen) != 0)
            return 0;
    } else if ((size_t)r->name_len != nlen || memcmp(name, blk, nlen) != 0) {
        return 0;
    }
link:;
    size_t llen = cstrlen(blk + 157, 100);
    return (size_t)r->link_len == llen && memcmp(heap + r->link_off, blk + 157, llen) == 0;
}

/* The chain at blk is a PAX 'x' header holding exactly "LEN path=<the record's name>\n",
 * then one plain header equal to the record (what Go writes for a long name). */
static int pax_path_matches(const uint8_t *blk, int64_t avail, const record_t *r, const char *heap) {
    int64_t size, v;
    if (blk[156] != 'x' || memcmp(blk + 257, "ustar\0", 6) != 0 || memcmp(blk + 508, "tar\0", 4) == 0 ||
        !checksum_ok(blk) || !plain_octal(blk + 124, 12, &size) || size < 7 || size > 1 << 20)
        return 0;
    /* Go parses every numeric field of every header: they must be valid here too. */
    if (!plain_octal(blk + 100, 8, &v) || !plain_octal(blk + 108, 8, &v) || !plain_octal(blk + 116, 8, &v) ||
        !plain_octal(blk + 136, 12, &v) || !plain_octal(blk + 329, 8, &v) || !plain_octal(blk + 337, 8, &v))
        return 0;
    int64_t padded = (size + BLOCK - 1) / BLOCK * BLOCK;
    if (avail != BLOCK + padded + BLOCK) return 0;
    const uint8_t *p = blk + BLOCK;
    int64_t n = 0, i = 0;
    while (i < size && p[i] >= '0' && p[i] <= '9' && i < 8) n = n * 10 + (p[i++] - '0');
    if (i == 0 || p[0] == '0' || i >= size || p[i] != ' ' || n != size) return 0;
    i++;
    if (size - i < 6 || memcmp(p + i, "path=", 5) != 0 || p[size - 1] != '\n') return 0;
    i += 5;
    int64_t vlen = size - 1 - i;
    if (vlen <= 0 || vlen != (int64_t)r->name_len || memchr(p + i, 0, (size_t)vlen) ||
        memcmp(p + i, heap + r->name_off, (size_t)vlen) != 0)
        return 0;
    return header_matches(blk + BLOCK + padded, r, heap, 1);
}

typedef struct {
    Py_buffer table, heap;
    const record_t *rec;
    Py_ssize_t n;
} layer_t;

static int layer_open(layer_t *L, PyObject *table, PyObject *heap) {
    if (PyObject_GetBuffer(table, &L->table, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(heap, &L->heap, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&L->table);
        return -1;
    }
    if (L->table.len % (Py_ssize_t)sizeof(record_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "landing table is not a whole number of records");
        goto fail;
    }
    L->rec = (const record_t *)L->table.buf;
    L->n = L->table.len / (Py_ssize_t)sizeof(record_t);
    /* The table is read from work/ and its numbers are used as offsets into the span: every
     * record must be what build_table makes (a header chain of at least one block before
     * the data, data that ends within 64 bits, records in stream order). */
    for (Py_ssize_t i = 0; i < L->n; i++) {
        const record_t *r = &L->rec[i];
        if ((uint64_t)r->name_off + r->name_len > (uint64_t)L->heap.len ||
            (uint64_t)r->link_off + r->link_len > (uint64_t)L->heap.len ||
            (uint64_t)r->path_off + r->path_len > (uint64_t)L->heap.len ||
            r->data_start < BLOCK || r->header_start < 0 || r->header_start > r->data_start - BLOCK ||
            r->size < 0 || r->size > INT64_MAX - r->data_start ||
            (i > 0 && r->data_start <= L->rec[i - 1].data_start)) {
            PyErr_Format(PyExc_ValueError, "landing table record %zd is inconsistent", i);
            goto fail;
        }
    }
    return 0;
fail:
    PyBuffer_Release(&L->table);
    PyBuffer_Release(&L->heap);
    return -1;
}

static void layer_close(layer_t *L) {
    PyBuffer_Release(&L->table);
    PyBuffer_Release(&L->heap);
}

/* First record whose data starts after `offset` (bisect_right on data_start). */
static Py_ssize_t first_after(const layer_t *L, int64_t offset) {
    Py_ssize_t lo = 0, hi = L->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (L->rec[mid].data_start <= offset) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

PyDoc_STRVAR(check_headers_doc,
"check_headers(table, heap, out, ustart) -> list[int]\n\n"
"Compare the header chains that end in the span [ustart, ustart + len(out)) with the\n"
"TOC; return the entries NOT verified here (chains that start before the span, or\n"
"that are not one plain block equal to the TOC): the caller checks those itself.");

static PyObject *check_headers(PyObject *self, PyObject *args) {
    PyObject *table, *heap;
    Py_buffer out;
    long long ustart;
    if (!PyArg_ParseTuple(args, "OOy*L", &table, &heap, &out, &ustart)) return NULL;
    layer_t L;
    if (layer_open(&L, table, heap) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    PyObject *todo = PyList_New(0);
    const uint8_t *buf = out.buf;
    int64_t uend = ustart + out.len;
    Py_ssize_t lo = first_after(&L, ustart), hi = first_after(&L, uend);
    const char *heapbuf = L.heap.buf;
    for (Py_ssize_t k = lo; todo && k < hi; k++) {
        const record_t *r = &L.rec[k];
        int64_t h = r->header_start;
        int ok;
        if (!(r->flags & F_CHECKABLE) || h < ustart || r->data_start - h < BLOCK) ok = 0;
        else if (r->flags & F_PAX_PATH) ok = pax_path_matches(buf + (h - ustart), r->data_start - h, r, heapbuf);
        else ok = h + BLOCK == r->data_start && header_matches(buf + (h - ustart), r, heapbuf, 0);
        if (!ok) {
            PyObject *i = PyLong_FromSsize_t(k);
            if (!i || PyList_Append(todo, i) < 0) Py_CLEAR(todo);
            Py_XDECREF(i);
        }
    }
    layer_close(&L);
    PyBuffer_Release(&out);
    return todo;
}

/* ---------------------------------------------------------------- writing files */

typedef struct {
    int root_fd;
    int direct;            /* O_DIRECT still worth trying on this filesystem */
    long long min_direct;  /* fewer aligned bytes than this go buffered (DirectWriter.min_direct) */
    long long direct_bytes;
    char parent[4096];     /* the cached parent directory (relative path) */
    int parent_fd;
    int err_code, err_errno;
    Py_ssize_t err_entry;
} writer_t;

/* The page-aligned copy of a direct write's middle, kept per thread between calls. */
static __thread uint8_t *scratch;
static __thread size_t scratch_len;

static int open_beneath(int dir_fd, const char *path, int flags) {
    static int have_openat2 = 1;
    if (have_openat2) {
        struct open_how how = {
            .flags = (uint64_t)(flags | O_CLOEXEC),
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        };
        long fd = syscall(SYS_openat2, dir_fd, path, &how, sizeof how);
        if (fd >= 0) return (int)fd;
        if (errno != ENOSYS && errno != EPERM) return -1;
        have_openat2 = 0; /* old kernel or seccomp: walk instead */
    }
    char buf[4096];
    size_t len = strlen(path);
    if (len >= sizeof buf) { errno = ENAMETOOLONG; return -1; }
    memcpy(buf, path, len + 1);
    int fd = dup(dir_fd);
    if (fd < 0) return -1;
    char *p = buf;
    for (;;) {
        char *slash = strchr(p, '/');
        if (slash) *slash = 0;
        if (strcmp(p, "..") == 0 || (p == buf && *p == 0)) { /* an escape, as RESOLVE_BENEATH says it */
            close(fd);
            errno = EXDEV;
            return -1;
        }
        if (!slash) break;
        int nfd = openat(fd, p, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int saved = errno;
        close(fd);
        if (nfd < 0) { errno = saved; return -1; }
        fd = nfd;
        p = slash + 1;
    }
    int out = openat(fd, p, flags | O_NOFOLLOW | O_CLOEXEC);
    int saved = errno;
    close(fd);
    errno = saved;
    return out;
}

static int fail(writer_t *w, int code, Py_ssize_t k) {
    w->err_code = code;
    w->err_errno = errno;
    w->err_entry = k;
    return -1;
}

/* The fd of the directory that holds `path` (len bytes); sets *base to its last component. */
static int parent_of(writer_t *w, const char *path, size_t len, const char **base, Py_ssize_t k) {
    const char *slash = memrchr(path, '/', len);
    if (!slash) {
        *base = path;
        return w->root_fd;
    }
    size_t plen = (size_t)(slash - path);
    *base = slash + 1;
    if (w->parent_fd >= 0 && strlen(w->parent) == plen && memcmp(w->parent, path, plen) == 0)
        return w->parent_fd;
    if (plen >= sizeof w->parent) {
        errno = ENAMETOOLONG;
        return fail(w, E_PARENT_UNSAFE, k);
    }
    char dir[sizeof w->parent];
    memcpy(dir, path, plen);
    dir[plen] = 0;
    int fd = open_beneath(w->root_fd, dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    if (fd < 0) {
        if (errno == ENOENT) return fail(w, E_PARENT_MISSING, k);
        if (errno == ELOOP || errno == ENOTDIR || errno == EXDEV) return fail(w, E_PARENT_UNSAFE, k);
        return fail(w, E_IO, k);
    }
    if (w->parent_fd >= 0) close(w->parent_fd);
    w->parent_fd = fd;
    memcpy(w->parent, dir, plen + 1);
    return fd;
}

static int pwrite_all(int fd, const uint8_t *data, size_t len, int64_t offset) {
    while (len) {
        ssize_t n = pwrite(fd, data, len, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

/* As prewarm.store.directio.DirectWriter.pwrite: the page-aligned middle of a large write
 * goes O_DIRECT (from an aligned copy), head and tail buffered; a filesystem that
 * refuses O_DIRECT turns it off for good. */
static int write_data(writer_t *w, int fd, const uint8_t *data, size_t len, int64_t offset) {
    int64_t end = offset + (int64_t)len;
    int64_t lo = (offset + ALIGN - 1) / ALIGN * ALIGN, hi = end / ALIGN * ALIGN;
    if (!w->direct || hi - lo < w->min_direct) return pwrite_all(fd, data, len, offset);
    size_t mid = (size_t)(hi - lo);
    int done = 0;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    if (fcntl(fd, F_SETFL, flags | O_DIRECT) < 0) {
        if (errno != EINVAL && errno != EOPNOTSUPP) return -1;
        w->direct = 0;
    } else {
        if (scratch_len < mid) {
            free(scratch);
            scratch = NULL;
            scratch_len = 0;
            size_t want = mid > (4u << 20) ? mid : (4u << 20);
            if (posix_memalign((void **)&scratch, ALIGN, want) != 0) {
                fcntl(fd, F_SETFL, flags);
                errno = ENOMEM;
                return -1;
            }
            scratch_len = want;
        }
        memcpy(scratch, data + (lo - offset), mid);
        if (pwrite_all(fd, scratch, mid, lo) == 0) {
            done = 1;
            w->direct_bytes += (long long)mid;
        } else if (errno == EINVAL) {
            w->direct = 0; /* alignment the device does not take: stop trying */
        } else {
            int saved = errno;
            fcntl(fd, F_SETFL, flags);
            errno = saved;
            return -1;
        }
        if (fcntl(fd, F_SETFL, flags) < 0) return -1;
    }
    if (!done && pwrite_all(fd, data + (lo - offset), mid, lo) < 0) return -1;
    if (lo > offset && pwrite_all(fd, data, (size_t)(lo - offset), offset) < 0) return -1;
    if (end > hi && pwrite_all(fd, data + (hi - offset), (size_t)(end - hi), hi) < 0) return -1;
    return 0;
}

/* An O_WRONLY fd on the regular file at the record's path (as LayerWriter.open_data). */
static int open_data(writer_t *w, const char *path, Py_ssize_t k) {
    int fd = open_beneath(w->root_fd, path, O_WRONLY | O_NOFOLLOW);
    if (fd < 0) return fail(w, E_OPEN_DATA, k);
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return fail(w, E_IO, k);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        errno = 0;
        return fail(w, E_NOT_REGULAR, k);
    }
    return fd;
}

/* A new file's data, then its metadata in layerfs.apply_meta's order: owner, mode (chown
 * clears set-id bits), then the mtime, after the last write. */
static int fill_file(writer_t *w, int fd, const uint8_t *data, size_t len, unsigned int uid, unsigned int gid,
                     int64_t mode, int64_t mtime_ns) {
    struct timespec times[2];
    int64_t secs = mtime_ns / 1000000000LL, ns = mtime_ns % 1000000000LL;
    if (ns < 0) { ns += 1000000000LL; secs -= 1; }
    times[0].tv_sec = times[1].tv_sec = (time_t)secs;
    times[0].tv_nsec = times[1].tv_nsec = (long)ns;
    if (len && write_data(w, fd, data, len, 0) < 0) return -1;
    if (fchown(fd, uid, gid) < 0 || fchmod(fd, (mode_t)(mode & 07777)) < 0 || futimens(fd, times) < 0) return -1;
    return 0;
}

/* As LayerWriter.create_whole: the file with all its data and metadata, in one open; the
 * metadata in layerfs.apply_meta's order (owner, mode, then mtime; a file with xattrs is
 * never created here). */
static int create_whole(writer_t *w, const record_t *r, const char *path, const uint8_t *data,
                        Py_ssize_t k) {
    const char *base;
    int pfd = parent_of(w, path, r->path_len, &base, k);
    if (pfd < 0) return -1;
    int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno != EEXIST) return fail(w, E_IO, k);
        fd = open_data(w, path, k); /* left by an interrupted landing of this span */
        if (fd < 0) return -1;
    }
    if (fill_file(w, fd, data, (size_t)r->size, r->uid, r->gid, r->mode, r->mtime_ns) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return fail(w, E_IO, k);
    }
    if (close(fd) < 0) return fail(w, E_IO, k);
    return 0;
}

PyDoc_STRVAR(write_pieces_doc,
"write_pieces(table, heap, root_fd, out, ustart, direct, min_direct) -> (skipped, error, direct, direct_bytes)\n\n"
"Write the file data that lies in the span [ustart, ustart + len(out)): files born\n"
"with this span are created whole, with their metadata; pieces of the others are\n"
"pwritten into them.  ``skipped`` lists (entry, file offset, stream offset, length) of\n"
"the pieces left to the caller; ``error`` is None or (code, errno, entry) of the\n"
"failure that stopped it; ``direct`` says whether O_DIRECT is still on.");

static PyObject *write_pieces(PyObject *self, PyObject *args) {
    PyObject *table, *heap;
    Py_buffer out;
    int root_fd, direct;
    long long ustart, min_direct;
    if (!PyArg_ParseTuple(args, "OOiy*LpL", &table, &heap, &root_fd, &out, &ustart, &direct, &min_direct))
        return NULL;
    layer_t L;
    if (layer_open(&L, table, heap) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    writer_t *w = PyMem_RawCalloc(1, sizeof *w);
    Py_ssize_t *skipped = PyMem_RawMalloc(sizeof(Py_ssize_t) * 4 * 64);
    if (!w || !skipped) {
        PyMem_RawFree(w);
        PyMem_RawFree(skipped);
        layer_close(&L);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    Py_ssize_t nskipped = 0, cap = 64;
    w->root_fd = root_fd;
    w->direct = direct;
    w->min_direct = min_direct > ALIGN ? min_direct : ALIGN;
    w->parent_fd = -1;
    const uint8_t *buf = out.buf;
    int64_t uend = ustart + out.len;
    const char *heapbuf = L.heap.buf;
    int rc = 0, oom = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t k = first_after(&L, ustart);
    if (k > 0) k--;
    for (; k < L.n && L.rec[k].data_start < uend; k++) {
        const record_t *r = &L.rec[k];
        int64_t d = r->data_start, e = d + r->size;
        if (!(r->flags & F_WRITE) || e <= ustart) continue;
        int64_t lo = d > ustart ? d : ustart, hi = e < uend ? e : uend;
        if ((r->flags & F_BORN) && !(r->flags & F_CREATABLE)) {
            if (nskipped == cap) {
                Py_ssize_t *more = PyMem_RawRealloc(skipped, sizeof(Py_ssize_t) * 4 * cap * 2);
                if (!more) { oom = 1; break; }
                skipped = more;
                cap *= 2;
            }
            skipped[4 * nskipped] = k;
            skipped[4 * nskipped + 1] = (Py_ssize_t)(lo - d);
            skipped[4 * nskipped + 2] = (Py_ssize_t)lo;
            skipped[4 * nskipped + 3] = (Py_ssize_t)(hi - lo);
            nskipped++;
            continue;
        }
        char path[4096];
        if (r->path_len >= sizeof path || memchr(heapbuf + r->path_off, 0, r->path_len)) {
            errno = ENAMETOOLONG;
            rc = fail(w, E_OPEN_DATA, k);
            break;
        }
        memcpy(path, heapbuf + r->path_off, r->path_len);
        path[r->path_len] = 0;
        if (r->flags & F_BORN) {
            if (lo != d || hi != e) { /* a born file lies inside one span: the table lies */
                errno = EINVAL;
                rc = fail(w, E_IO, k);
                break;
            }
            if ((rc = create_whole(w, r, path, buf + (d - ustart), k)) < 0) break;
            continue;
        }
        int fd = open_data(w, path, k);
        if (fd < 0) { rc = -1; break; }
        if (write_data(w, fd, buf + (lo - ustart), (size_t)(hi - lo), lo - d) < 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            rc = fail(w, E_IO, k);
            break;
        }
        if (close(fd) < 0) { rc = fail(w, E_IO, k); break; }
    }
    if (w->parent_fd >= 0) close(w->parent_fd);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL, *skip = NULL, *error = NULL;
    if (oom) {
        PyErr_NoMemory();
        goto done;
    }
    skip = PyList_New(nskipped);
    if (!skip) goto done;
    for (Py_ssize_t i = 0; i < nskipped; i++) {
        PyObject *t = Py_BuildValue("(nnnn)", skipped[4 * i], skipped[4 * i + 1], skipped[4 * i + 2],
                                    skipped[4 * i + 3]);
        if (!t) goto done;
        PyList_SET_ITEM(skip, i, t);
    }
    if (rc < 0) error = Py_BuildValue("(iin)", w->err_code, w->err_errno, w->err_entry);
    else error = Py_NewRef(Py_None);
    if (!error) goto done;
    result = Py_BuildValue("(OOOL)", skip, error, w->direct ? Py_True : Py_False, w->direct_bytes);
done:
    Py_XDECREF(skip);
    Py_XDECREF(error);
    PyMem_RawFree(skipped);
    PyMem_RawFree(w);
    layer_close(&L);
    PyBuffer_Release(&out);
    return result;
}

/* ---------------------------------------------------------------- building the table */

/* v as an int64.  Not exactly an int: *odd set (the Python builder takes the table).  Beyond
 * 64 bits: *fits cleared (the entry is not plain), *sign still tells its sign. */
static int64_t as_int64(PyObject *v, int *fits, int *odd, int *sign) {
    if (!v || !PyLong_CheckExact(v)) { *odd = 1; return 0; }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); *odd = 1; return 0; }
    if (overflow) { *fits = 0; if (sign) *sign = overflow; return 0; }
    if (sign) *sign = (x > 0) - (x < 0);
    return (int64_t)x;
}

/* obj.name as as_int64 takes it. */
static int64_t attr_int64(PyObject *obj, PyObject *name, int *fits, int *odd, int *sign) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) PyErr_Clear();
    int64_t x = as_int64(v, fits, odd, sign);
    Py_XDECREF(v);
    return x;
}

/* Append raw to the heap once (later equal strings share it); its offset, or -1 with an error. */
static Py_ssize_t place(PyObject *strings, PyObject *heap, PyObject *raw) {
    PyObject *at = PyDict_GetItemWithError(strings, raw);
    if (at) return PyLong_AsSsize_t(at);
    if (PyErr_Occurred()) return -1;
    Py_ssize_t off = PyByteArray_GET_SIZE(heap), len = PyBytes_GET_SIZE(raw);
    if (PyByteArray_Resize(heap, off + len) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(heap) + off, PyBytes_AS_STRING(raw), (size_t)len);
    PyObject *o = PyLong_FromSsize_t(off);
    if (!o || PyDict_SetItem(strings, raw, o) < 0) { Py_XDECREF(o); return -1; }
    Py_DECREF(o);
    return off;
}

static uint8_t type_flag(PyObject *type) {
    static const char *names[] = {"reg", "hardlink", "symlink", "char", "block", "dir", "fifo"};
    for (int i = 0; i < 7; i++)
        if (PyUnicode_CompareWithASCIIString(type, names[i]) == 0) return (uint8_t)('0' + i);
    return '?';
}

PyDoc_STRVAR(build_table_doc,
"build_table(files, placements, born, meta, header_starts) -> (records, heap) or None\n\n"
"landing.build_table's records and heap, byte for byte; None for anything it does not take\n"
"as plainly (a name that does not encode, a number that is not an int, a heap over 4 GiB),\n"
"which the Python builder then handles and words.");

static PyObject *build_table(PyObject *self, PyObject *args) {
    PyObject *files, *placements, *born_obj, *meta, *hstarts;
    if (!PyArg_ParseTuple(args, "OOSOO", &files, &placements, &born_obj, &meta, &hstarts)) return NULL;
    PyObject *fs = NULL, *ps = NULL, *ms = NULL, *hs = NULL, *strings = NULL, *heap = NULL, *table = NULL,
             *result = NULL;
    fs = PySequence_Fast(files, "files");
    ps = fs ? PySequence_Fast(placements, "placements") : NULL;
    ms = ps ? PySequence_Fast(meta, "meta") : NULL;
    hs = ms ? PySequence_Fast(hstarts, "header_starts") : NULL;
    if (!hs) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fs);
    if (PySequence_Fast_GET_SIZE(ps) != n || PySequence_Fast_GET_SIZE(ms) != n ||
        PySequence_Fast_GET_SIZE(hs) != n || PyBytes_GET_SIZE(born_obj) != n) {
        PyErr_SetString(PyExc_ValueError,
                        "build_table: files, placements, born, meta and header_starts differ in length");
        goto done;
    }
    const char *born = PyBytes_AS_STRING(born_obj);
    strings = PyDict_New();
    heap = PyByteArray_FromStringAndSize(NULL, 0);
    table = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(record_t));
    if (!strings || !heap || !table) goto done;
    record_t *rec = (record_t *)PyBytes_AS_STRING(table);
    memset(rec, 0, (size_t)n * sizeof(record_t));
    static PyObject *s_name, *s_linkname, *s_path, *s_kind, *s_final, *s_type, *s_size, *s_offset, *s_xattrs,
                    *s_devmajor, *s_devminor;
    if (!s_name) {
        s_name = PyUnicode_InternFromString("name");
        s_linkname = PyUnicode_InternFromString("linkname");
        s_path = PyUnicode_InternFromString("path");
        s_kind = PyUnicode_InternFromString("kind");
        s_final = PyUnicode_InternFromString("final");
        s_type = PyUnicode_InternFromString("type");
        s_size = PyUnicode_InternFromString("uncompressed_size");
        s_offset = PyUnicode_InternFromString("uncompressed_offset");
        s_xattrs = PyUnicode_InternFromString("xattrs");
        s_devmajor = PyUnicode_InternFromString("devmajor");
        s_devminor = PyUnicode_InternFromString("devminor");
        if (!s_name || !s_linkname || !s_path || !s_kind || !s_final || !s_type || !s_size || !s_offset ||
            !s_xattrs || !s_devmajor || !s_devminor) goto done;
    }
    int fallback = 0, failed = 0;
    for (Py_ssize_t i = 0; i < n && !fallback; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(fs, i), *p = PySequence_Fast_GET_ITEM(ps, i);
        PyObject *m = PySequence_Fast_GET_ITEM(ms, i);
        record_t *r = &rec[i];
        int odd = 0, fits = 1, where = 1, size_sign = 0;
        if (!PyTuple_CheckExact(m) || PyTuple_GET_SIZE(m) != 5) { fallback = 1; break; }
        int64_t uid = as_int64(PyTuple_GET_ITEM(m, 0), &fits, &odd, NULL);
        int64_t gid = as_int64(PyTuple_GET_ITEM(m, 1), &fits, &odd, NULL);
        int64_t mode = as_int64(PyTuple_GET_ITEM(m, 2), &fits, &odd, NULL);
        int64_t mtime = as_int64(PyTuple_GET_ITEM(m, 3), &fits, &odd, NULL);
        PyObject *real_xattrs = PyTuple_GET_ITEM(m, 4);
        int64_t size = attr_int64(e, s_size, &fits, &odd, &size_sign);
        int64_t dmaj = attr_int64(e, s_devmajor, &fits, &odd, NULL);
        int64_t dmin = attr_int64(e, s_devminor, &fits, &odd, NULL);
        /* offsets beyond 64 bits: struct.pack refuses them in the Python builder too */
        r->data_start = attr_int64(e, s_offset, &where, &odd, NULL);
        r->header_start = as_int64(PySequence_Fast_GET_ITEM(hs, i), &where, &odd, NULL);
        PyObject *name = PyObject_GetAttr(e, s_name), *link = PyObject_GetAttr(e, s_linkname);
        PyObject *type = PyObject_GetAttr(e, s_type), *xattrs = PyObject_GetAttr(e, s_xattrs);
        PyObject *kind = PyObject_GetAttr(p, s_kind), *path = PyObject_GetAttr(p, s_path);
        PyObject *final = PyObject_GetAttr(p, s_final);
        PyObject *bname = NULL, *blink = NULL, *bpath = NULL;
        if (!name || !link || !type || !xattrs || !kind || !path || !final || !PyUnicode_Check(name) ||
            !PyUnicode_Check(link) || !PyUnicode_Check(type) || !PyTuple_Check(xattrs) || !PyUnicode_Check(kind) ||
            !PyUnicode_Check(path) || !PyTuple_Check(real_xattrs) || odd || !where) {
            fallback = 1;
            goto next;
        }
        bname = PyUnicode_AsEncodedString(name, "utf-8", "surrogateescape");
        blink = bname ? PyUnicode_AsEncodedString(link, "utf-8", "surrogateescape") : NULL;
        bpath = blink ? PyUnicode_EncodeFSDefault(path) : NULL;
        if (!bpath) { fallback = 1; goto next; }
        int plain = fits && uid >= 0 && uid <= 0xFFFFFFFFLL && gid >= 0 && gid <= 0xFFFFFFFFLL;
        int is_final = PyObject_IsTrue(final);
        if (is_final < 0) { fallback = 1; goto next; }
        uint8_t flags = plain ? F_PLAIN : 0;
        /* as Python: the TOC size's sign decides, even for a size beyond 64 bits */
        if (PyUnicode_CompareWithASCIIString(kind, "reg") == 0 && is_final && size_sign > 0) flags |= F_WRITE;
        if (born[i]) {
            flags |= F_BORN;
            if (plain && PyTuple_GET_SIZE(real_xattrs) == 0) flags |= F_CREATABLE;
        }
        uint8_t tflag = type_flag(type);
        if (plain && tflag != '?') {
            Py_ssize_t nx = PyTuple_GET_SIZE(xattrs);
            if (nx == 0) {
                flags |= F_CHECKABLE;
            } else if (nx == 1) {
                PyObject *rec0 = PyTuple_GET_ITEM(xattrs, 0);
                if (PyTuple_Check(rec0) && PyTuple_GET_SIZE(rec0) == 2) {
                    PyObject *pair = PyTuple_Pack(2, s_path, name);
                    int eq = pair ? PyObject_RichCompareBool(rec0, pair, Py_EQ) : -1;
                    Py_XDECREF(pair);
                    if (eq < 0) { fallback = 1; goto next; }
                    if (eq) flags |= F_CHECKABLE | F_PAX_PATH;
                }
            }
        }
        if (!plain) uid = gid = mode = mtime = 0;
        Py_ssize_t name_off = place(strings, heap, bname), link_off = name_off < 0 ? -1 : place(strings, heap, blink);
        Py_ssize_t path_off = link_off < 0 ? -1 : place(strings, heap, bpath);
        if (path_off < 0) { failed = 1; goto next; }
        r->size = plain ? size : 0;
        r->mode = mode;
        r->devmajor = plain ? dmaj : 0;
        r->devminor = plain ? dmin : 0;
        r->mtime_ns = mtime;
        r->uid = (uint32_t)uid;
        r->gid = (uint32_t)gid;
        r->name_off = (uint32_t)name_off;
        r->name_len = (uint32_t)PyBytes_GET_SIZE(bname);
        r->link_off = (uint32_t)link_off;
        r->link_len = (uint32_t)PyBytes_GET_SIZE(blink);
        r->path_off = (uint32_t)path_off;
        r->path_len = (uint32_t)PyBytes_GET_SIZE(bpath);
        r->type = tflag;
        r->flags = flags;
        if (PyByteArray_GET_SIZE(heap) >= ((Py_ssize_t)1 << 32)) fallback = 1;
    next:
        if (!failed) PyErr_Clear(); /* a fallback's error: the Python builder raises it */
        Py_XDECREF(bname); Py_XDECREF(blink); Py_XDECREF(bpath);
        Py_XDECREF(name); Py_XDECREF(link); Py_XDECREF(type); Py_XDECREF(xattrs);
        Py_XDECREF(kind); Py_XDECREF(path); Py_XDECREF(final);
        if (failed) goto done; /* out of memory: raised */
    }
    if (fallback) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *hb = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(heap), PyByteArray_GET_SIZE(heap));
        if (hb) result = PyTuple_Pack(2, table, hb);
        Py_XDECREF(hb);
    }
done:
    Py_XDECREF(fs); Py_XDECREF(ps); Py_XDECREF(ms); Py_XDECREF(hs);
    Py_XDECREF(strings); Py_XDECREF(heap); Py_XDECREF(table);
    return result;
}

PyDoc_STRVAR(create_files_doc,
"create_files(dir_fd, files, direct, min_direct) -> (failed, errno, direct)\n\n"
"Create each (name, data, uid, gid, mode, mtime_ns) of ``files`` in ``dir_fd`` (O_EXCL, no symlink\n"
"followed) with its data, owner, mode and mtime, in order, the GIL released for the whole batch.\n"
"``failed`` is the index of the file that failed with ``errno`` (-1, 0: none); the files after it\n"
"are not created. ``direct`` says whether O_DIRECT is still worth trying.");

typedef struct {
    const char *name;
    Py_buffer data;
    unsigned int uid, gid;
    long long mode, mtime_ns;
} new_file_t;

static PyObject *create_files(PyObject *self, PyObject *args) {
    int dir_fd, direct;
    PyObject *files;
    long long min_direct;
    if (!PyArg_ParseTuple(args, "iO!pL", &dir_fd, &PyList_Type, &files, &direct, &min_direct)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(files), got = 0;
    new_file_t *todo = PyMem_Calloc(n ? (size_t)n : 1, sizeof(new_file_t));
    if (!todo) return PyErr_NoMemory();
    PyObject *result = NULL;
    for (; got < n; got++) {
        PyObject *item = PyList_GET_ITEM(files, got);
        new_file_t *f = &todo[got];
        if (!PyTuple_Check(item) ||
            !PyArg_ParseTuple(item, "yy*IILL", &f->name, &f->data, &f->uid, &f->gid, &f->mode, &f->mtime_ns)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "create_files takes a list of tuples");
            goto done;
        }
    }
    writer_t w;
    memset(&w, 0, sizeof w);
    w.root_fd = dir_fd;
    w.direct = direct;
    w.min_direct = min_direct;
    w.parent_fd = -1;
    Py_ssize_t failed = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && failed < 0; i++) {
        new_file_t *f = &todo[i];
        int fd = openat(dir_fd, f->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) {
            err = errno;
        } else {
            if (fill_file(&w, fd, (const uint8_t *)f->data.buf, (size_t)f->data.len, f->uid, f->gid, f->mode,
                          f->mtime_ns) < 0)
                err = errno ? errno : EIO;
            if (close(fd) < 0 && !err) err = errno;
        }
        if (err) failed = i;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(niO)", failed, err, w.direct ? Py_True : Py_False);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&todo[i].data);
    PyMem_Free(todo);
    return result;
}

static PyMethodDef methods[] = {
    {"build_table", build_table, METH_VARARGS, build_table_doc},
    {"check_headers", check_headers, METH_VARARGS, check_headers_doc},
    {"create_files", create_files, METH_VARARGS, create_files_doc},
    {"write_pieces", write_pieces, METH_VARARGS, write_pieces_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "prewarm.store._landing",
    "Header checks and file writes of span landing, in C (see prewarm.store.landing).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__landing(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(record_t)) < 0 ||
              PyModule_AddIntConstant(m, "F_WRITE", F_WRITE) < 0 ||
              PyModule_AddIntConstant(m, "F_BORN", F_BORN) < 0 ||
              PyModule_AddIntConstant(m, "F_CHECKABLE", F_CHECKABLE) < 0 ||
              PyModule_AddIntConstant(m, "F_CREATABLE", F_CREATABLE) < 0 ||
              PyModule_AddIntConstant(m, "F_PLAIN", F_PLAIN) < 0 ||
              PyModule_AddIntConstant(m, "F_PAX_PATH", F_PAX_PATH) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
