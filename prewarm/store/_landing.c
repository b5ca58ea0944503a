/* The per-file work of landing a span, in C: what :mod:`prewarm.store.landing` drives.
 *
 * Why C: landing a span of a layer of small files is one header check and one file
 * creation per file (open, write, fstat, futimens, close; fchown and fchmod where needed).  In Python that was
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
 * over, and words the errors, for any entry C does not take as plainly).  ``toc_records``
 * and ``place_records`` build them straight from the zTOC flatbuffer and the C tree check
 * (prewarm.store._tree), without a Python object per entry.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../index/_flatbuf.h"
#include "../index/_tarheader.h"

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

#define BLOCK TAR_BLOCK
#define ALIGN 4096
/* mtimes whose nanoseconds fit an int64 (years 1678..2262); the Python side takes the rest. */
#define MIN_SECS (-9223372035LL)
#define MAX_SECS (9223372036LL)

/* ---------------------------------------------------------------- header checks */

/* 1 when the block is one plain header whose fields all equal the record's (its name
 * too, unless `named` says a PAX path record already matched the TOC name). */
static int header_matches(const uint8_t *blk, const record_t *r, const char *heap, int named) {
    tar_header_t h;
    if (!plain_header(blk, &h) || h.flag != r->type) return 0;
    int ustar = h.ustar;
    if (h.mode != r->mode || (uint32_t)h.uid != r->uid || (uint32_t)h.gid != r->gid || h.size != r->size ||
        h.dmaj != r->devmajor || h.dmin != r->devminor)
        return 0;
    if (h.mtime < MIN_SECS || h.mtime >= MAX_SECS || h.mtime * 1000000000LL != r->mtime_ns) return 0;
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
    tar_header_t h;
    if (!plain_header(blk, &h) || h.flag != 'x' || !h.ustar || h.size < 7 || h.size > TAR_MAX_SPECIAL_FILE_SIZE) return 0;
    int64_t padded = (h.size + BLOCK - 1) / BLOCK * BLOCK;
    if (avail != BLOCK + padded + BLOCK) return 0;
    const uint8_t *p = blk + BLOCK, *value;
    int64_t vlen;
    if (p[0] == '0' || !path_record(p, h.size, &value, &vlen)) return 0;
    if (vlen <= 0 || vlen != (int64_t)r->name_len || memcmp(value, heap + r->name_off, (size_t)vlen) != 0) return 0;
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

/* Copy heap[off, off + len) into out as a C string; 0 if it does not fit or holds a NUL. */
static int heap_string(const Py_buffer *heap, uint32_t off, uint32_t len, char *out, size_t cap) {
    if ((uint64_t)off + len > (uint64_t)heap->len || len >= cap) return 0;
    memcpy(out, (const char *)heap->buf + off, len);
    out[len] = 0;
    return memchr(out, 0, len) == NULL;
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

/* The mode a new file is opened with: its permission bits, never a set-id bit (those are
 * set by fchmod, after any fchown, which would clear them). */
#define CREATE_MODE(mode) ((mode_t)((mode) & 0777))

/* A new file's data, then its metadata in layerfs.apply_meta's order: owner, mode (chown
 * clears set-id bits), then the mtime, after the last write.  Owner and mode are set only
 * where the file does not have them already: most files of an image are root's, as the
 * file just created is, and opened with their permission bits (CREATE_MODE) the umask
 * rarely cuts any.  One fstat then saves an fchown and an fchmod, each a journalled inode
 * change (~10% of a small file's creation, measured). */
static int fill_file(writer_t *w, int fd, const uint8_t *data, size_t len, unsigned int uid, unsigned int gid,
                     int64_t mode, int64_t mtime_ns) {
    struct timespec times[2];
    struct stat st;
    int64_t secs = mtime_ns / 1000000000LL, ns = mtime_ns % 1000000000LL;
    if (ns < 0) { ns += 1000000000LL; secs -= 1; }
    times[0].tv_sec = times[1].tv_sec = (time_t)secs;
    times[0].tv_nsec = times[1].tv_nsec = (long)ns;
    if (len && write_data(w, fd, data, len, 0) < 0) return -1;
    if (fstat(fd, &st) < 0) return -1;
    if (st.st_uid != (uid_t)uid || st.st_gid != (gid_t)gid) {
        if (fchown(fd, uid, gid) < 0 || fstat(fd, &st) < 0) return -1;
    }
    if ((st.st_mode & 07777) != (mode_t)(mode & 07777) && fchmod(fd, (mode_t)(mode & 07777)) < 0) return -1;
    if (futimens(fd, times) < 0) return -1;
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
    int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, CREATE_MODE(r->mode));
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
        if (!heap_string(&L.heap, r->path_off, r->path_len, path, sizeof path)) {
            errno = ENAMETOOLONG;
            rc = fail(w, E_OPEN_DATA, k);
            break;
        }
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

/* ---------------------------------------------------------------- records straight from the zTOC */

#define MAX_NAME_BYTES (1 << 16)  /* ztoc._MAX_NAME_BYTES */
#define MAX_SHORT_STRING (1 << 12) /* ztoc._MAX_SHORT_STRING */
#define ENTRY_COST 256             /* ztoc._ENTRY_COST */
#define XATTR_COST 128             /* ztoc._XATTR_COST */
#define HEAP_LIMIT ((Py_ssize_t)1 << 32)

static int digits(const uint8_t *p, int n, int *out) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 1;
}

/* Days from 1970-01-01 to y-m-d of the proleptic Gregorian calendar (Howard Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* layerfs.parse_mod_time for the form every builder writes, "YYYY-MM-DDTHH:MM:SS[.frac]Z", with
 * datetime's range checks; 0 for anything else (Python parses it, or words why not). */
static int utc_time_ns(const uint8_t *p, int64_t len, int64_t *ns) {
    if (len == 0) { *ns = 0; return 1; }
    if (len < 20 || (p[len - 1] != 'Z' && p[len - 1] != 'z')) return 0;
    int y, mo, d, h, mi, s;
    if (!digits(p, 4, &y) || p[4] != '-' || !digits(p + 5, 2, &mo) || p[7] != '-' || !digits(p + 8, 2, &d) ||
        p[10] != 'T' || !digits(p + 11, 2, &h) || p[13] != ':' || !digits(p + 14, 2, &mi) || p[16] != ':' ||
        !digits(p + 17, 2, &s))
        return 0;
    int64_t frac = 0;
    int64_t rest = len - 20; /* between the seconds and the Z */
    if (rest) {
        if (p[19] != '.' || rest < 2 || rest > 10) return 0;
        for (int64_t i = 20; i < len - 1; i++) {
            if (p[i] < '0' || p[i] > '9') return 0;
            frac = frac * 10 + (p[i] - '0');
        }
        for (int64_t i = rest - 1; i < 9; i++) frac *= 10;
    }
    static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > dim[mo - 1] + (mo == 2 && leap) || h > 23 || mi > 59 || s > 59)
        return 0;
    int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s;
    /* a record holds int64 ns (1677-2262); beyond it Python keeps the entry's metadata aside */
    if (secs > INT64_MAX / 1000000000 - 1 || secs < INT64_MIN / 1000000000 + 1) return 0;
    *ns = secs * 1000000000 + frac;
    return 1;
}

/* Append len bytes to the heap bytearray; its offset, or -1 (an error set, or -2: over 4 GiB). */
static Py_ssize_t heap_add(PyObject *heap, const void *data, Py_ssize_t len) {
    Py_ssize_t off = PyByteArray_GET_SIZE(heap);
    if (off + len >= HEAP_LIMIT) return -2;
    if (len == 0) return 0;
    if (PyByteArray_Resize(heap, off + len) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(heap) + off, data, (size_t)len);
    return off;
}

/* One TOC entry as the flatbuffer holds it (strings point into the zTOC). */
typedef struct {
    const uint8_t *name, *link, *mtime;
    int64_t name_len, link_len, mtime_len;
    int64_t offset, size, mode, devmajor, devminor;
    uint32_t uid, gid;
    int type;       /* index into toc_types: the tar type flag is '0' + type */
    int pax_path;   /* its one PAX record is Go's long name: path=<name> */
    int has_xattrs; /* other PAX records (Python keeps their xattrs) */
    int64_t cost;   /* what ztoc._read_entry charges it against the decoding budget */
} toc_entry_t;

static const char *toc_types[7] = {"reg", "hardlink", "symlink", "char", "block", "dir", "fifo"};

/* TOC entry k read as decode_one in prewarm/index/_ztoc.c takes it; 0 when Python must (not
 * plainly well-formed: a field outside its table, a string over its limit, an unknown type, a
 * NUL in a name, an empty name), or when it costs more than `left` of the budget. */
static int read_toc_entry(const buf_t *B, int64_t start, int64_t k, int64_t left, toc_entry_t *e) {
    static const int widths[14] = {4, 4, 8, 8, 4, 8, 4, 4, 4, 4, 4, 8, 8, 4};
    static const int sidx[6] = {0, 1, 4, 8, 9, 10}; /* name, type, linkname, uname, gname, mod_time */
    static const int64_t limit[6] = {MAX_NAME_BYTES, 16, MAX_NAME_BYTES, MAX_SHORT_STRING, MAX_SHORT_STRING, 64};
    static const int iidx[5] = {2, 3, 5, 11, 12}; /* offset, size, mode, devmajor, devminor */
    int64_t t = toc_entry_at(B, start, k), o[14], sl[6];
    const uint8_t *sp[6];
    if (t < 0 || !table_fields(B, t, 14, widths, o)) return 0;
    for (int i = 0; i < 6; i++)
        if (!string_at(B, o[sidx[i]], limit[i], &sp[i], &sl[i])) return 0;
    e->name = sp[0], e->name_len = sl[0], e->link = sp[2], e->link_len = sl[2], e->mtime = sp[5], e->mtime_len = sl[5];
    if (e->name_len == 0 || memchr(e->name, 0, (size_t)e->name_len) || memchr(e->link, 0, (size_t)e->link_len))
        return 0;
    e->type = -1;
    for (int i = 0; i < 7; i++)
        if ((size_t)sl[1] == strlen(toc_types[i]) && memcmp(sp[1], toc_types[i], (size_t)sl[1]) == 0) e->type = i;
    if (e->type < 0) return 0;
    int64_t cost = ENTRY_COST + sl[0] + sl[2] + sl[3] + sl[4] + sl[5];
    e->pax_path = e->has_xattrs = 0;
    if (o[13]) { /* every PAX record: ztoc._read_xattrs' cost */
        int64_t v = o[13] + u32(B, o[13]);
        if (v > B->n - 4) return 0;
        int64_t nx = u32(B, v);
        if (nx * 4 > B->n - v - 4) return 0;
        cost += nx * XATTR_COST;
        for (int64_t j = 0; j < nx && cost <= left; j++) {
            static const int xw[2] = {4, 4};
            int64_t ref = v + 4 + 4 * j, f[2], kl, vl;
            const uint8_t *kp, *vp;
            if (!table_fields(B, ref + u32(B, ref), 2, xw, f) || !string_at(B, f[0], MAX_SHORT_STRING, &kp, &kl) ||
                !string_at(B, f[1], MAX_NAME_BYTES, &vp, &vl))
                return 0;
            cost += kl + vl;
            if (nx == 1 && kl == 4 && memcmp(kp, "path", 4) == 0 && vl == e->name_len &&
                memcmp(vp, e->name, (size_t)vl) == 0)
                e->pax_path = 1;
        }
        e->has_xattrs = nx > 0 && !e->pax_path;
    }
    if (cost > left) return 0;
    e->cost = cost;
    int64_t ints[5] = {0, 0, 0, 0, 0};
    for (int i = 0; i < 5; i++)
        if (o[iidx[i]]) memcpy(&ints[i], B->b + o[iidx[i]], 8);
    e->offset = ints[0], e->size = ints[1], e->mode = ints[2], e->devmajor = ints[3], e->devminor = ints[4];
    e->uid = o[6] ? u32(B, o[6]) : 0;
    e->gid = o[7] ? u32(B, o[7]) : 0;
    return 1;
}

/* The TOC vector's Py_buffer and bounds. */
static int toc_vector(const Py_buffer *view, Py_ssize_t start, Py_ssize_t count, buf_t *B) {
    B->b = view->buf;
    B->n = view->len;
    if (start < 0 || count < 0 || count > (B->n - start) / 4) {
        PyErr_SetString(PyExc_ValueError, "TOC vector lies outside the buffer");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(toc_records_doc,
"toc_records(buf, start, count, archive_size, allowance, parse_mod_time, file_backed=False)\n"
"    -> (records, heap, rich, data_end) or None\n\n"
"The landing records of the TOC vector at ``start`` of the zTOC in ``buf``, read from the\n"
"flatbuffer (no Python object per entry): data and header offsets, size, mode, devices,\n"
"mtime, uid, gid, name, link name, type, and the flags F_PLAIN, F_CHECKABLE, F_PAX_PATH.\n"
"Paths and the flags that need the tree check are left to place_records.  ``rich`` lists the\n"
"entries with PAX records other than Go's long-name ``path`` (their xattrs are Python's).\n"
"``parse_mod_time`` parses a time C does not (then the next entry with the same string\n"
"reuses it).  None for anything the Python derive must take and word: an entry not plainly\n"
"well-formed, past the decoding ``allowance``, a time out of a record's range, a header\n"
"chain that does not fit the archive, a heap over 4 GiB.  With ``file_backed`` (``buf`` maps\n"
"a file) the pass gives the buffer's pages back as it goes.");

static PyObject *toc_records(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, count;
    long long usize, allowance;
    PyObject *parse;
    int file_backed = 0;
    if (!PyArg_ParseTuple(args, "y*nnLLO|p", &view, &start, &count, &usize, &allowance, &parse, &file_backed))
        return NULL;
    buf_t B;
    PyObject *records = NULL, *heap = NULL, *rich = NULL, *result = NULL;
    const uint8_t *last_time = NULL;
    int64_t last_time_len = -1, last_ns = 0;
    if (!toc_vector(&view, start, count, &B)) goto done;
    records = PyByteArray_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(record_t));
    heap = PyByteArray_FromStringAndSize(NULL, 0);
    rich = PyList_New(0);
    if (!records || !heap || !rich) goto done;
    record_t *rec = (record_t *)PyByteArray_AS_STRING(records);
    memset(rec, 0, (size_t)count * sizeof(record_t));
    int64_t spent = 0, pos = 0;
    int unsure = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        toc_entry_t e;
        if (file_backed && k && (k & (GIVE_BACK_EVERY - 1)) == 0) give_back_all(&B);
        if (!read_toc_entry(&B, start, k, allowance - spent, &e)) { unsure = 1; break; }
        spent += e.cost;
        /* the tree check's bounds and derive's header chain: anything else is Python's to word */
        if (e.offset < 0 || e.size < 0 || e.offset > usize || (e.type == 0 && e.size > usize - e.offset) ||
            e.offset < pos + 512) {
            unsure = 1;
            break;
        }
        int64_t data = e.type == 0 ? e.size : 0;
        record_t *r = &rec[k];
        r->header_start = pos;
        pos = e.offset + data + (-data & 511);
        if (pos > usize) { unsure = 1; break; }
        int64_t ns;
        if (e.mtime_len == last_time_len && memcmp(e.mtime, last_time, (size_t)e.mtime_len) == 0) {
            ns = last_ns;
        } else if (!utc_time_ns(e.mtime, e.mtime_len, &ns)) {
            PyObject *text = PyUnicode_DecodeUTF8((const char *)e.mtime, (Py_ssize_t)e.mtime_len, "surrogateescape");
            PyObject *v = text ? PyObject_CallOneArg(parse, text) : NULL;
            Py_XDECREF(text);
            int overflow = 0;
            ns = v && PyLong_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : 0;
            Py_XDECREF(v);
            if (!v || overflow || PyErr_Occurred()) { PyErr_Clear(); unsure = 1; break; }
        }
        last_time = e.mtime;
        last_time_len = e.mtime_len;
        last_ns = ns;
        Py_ssize_t name_off = heap_add(heap, e.name, (Py_ssize_t)e.name_len);
        Py_ssize_t link_off = name_off < 0 ? name_off : heap_add(heap, e.link, (Py_ssize_t)e.link_len);
        if (link_off == -1) goto done;
        if (link_off < 0) { unsure = 1; break; }
        r->data_start = e.offset;
        r->size = e.size;
        r->mode = e.mode;
        r->devmajor = e.devmajor;
        r->devminor = e.devminor;
        r->mtime_ns = ns;
        r->uid = e.uid;
        r->gid = e.gid;
        r->name_off = (uint32_t)name_off;
        r->name_len = (uint32_t)e.name_len;
        r->link_off = (uint32_t)link_off;
        r->link_len = (uint32_t)e.link_len;
        r->type = (uint8_t)('0' + e.type);
        r->flags = F_PLAIN | (e.has_xattrs ? 0 : F_CHECKABLE) | (e.pax_path ? F_PAX_PATH : 0);
        if (e.has_xattrs) {
            PyObject *i = PyLong_FromSsize_t(k);
            int bad = !i || PyList_Append(rich, i) < 0;
            Py_XDECREF(i);
            if (bad) goto done;
        }
    }
    if (unsure)
        result = Py_NewRef(Py_None);
    else
        result = Py_BuildValue("(OOOL)", records, heap, rich, (long long)pos);
done:
    Py_XDECREF(records);
    Py_XDECREF(heap);
    Py_XDECREF(rich);
    PyBuffer_Release(&view);
    return result;
}

/* Where a path already lies in the heap within its entry's name (a name "./a/b" or "a/b/" holds
 * the path "a/b"), or -1. */
static Py_ssize_t within_name(const char *heap, const record_t *r, const char *path, uint32_t len) {
    if (len > r->name_len) return -1;
    const char *name = heap + r->name_off;
    if (memcmp(name, path, len) == 0) return r->name_off;
    if (memcmp(name + r->name_len - len, path, len) == 0) return r->name_off + r->name_len - len;
    return -1;
}

PyDoc_STRVAR(place_records_doc,
"place_records(records, heap, kinds, finals, fresh, linked, paths, path_index, span_ends) -> (born, extents)\n\n"
"Complete toc_records' records with the tree check's placements (prewarm.store._tree.check_toc):\n"
"each record's path (added to ``heap`` unless its name holds it), F_WRITE, F_BORN and\n"
"F_CREATABLE; ``born`` as table._born_at_landing says it, and the span map's extents\n"
"(int64 starts, then ends, then entry ids: SpanMap.arrays) of the files the layer keeps.");

static PyObject *place_records(PyObject *self, PyObject *args) {
    PyObject *records, *heap;
    Py_buffer kinds, finals, fresh, linked, paths, index, ends;
    if (!PyArg_ParseTuple(args, "O!O!y*y*y*y*y*y*y*", &PyByteArray_Type, &records, &PyByteArray_Type, &heap, &kinds,
                          &finals, &fresh, &linked, &paths, &index, &ends))
        return NULL;
    PyObject *born = NULL, *extents = NULL, *result = NULL;
    Py_ssize_t n = PyByteArray_GET_SIZE(records) / (Py_ssize_t)sizeof(record_t);
    Py_ssize_t nspans = ends.len / 8;
    int64_t *starts_out = NULL;
    if (kinds.len != n || finals.len != n || fresh.len != n || linked.len != n || index.len != 8 * n || nspans < 1) {
        PyErr_SetString(PyExc_ValueError, "place_records: the columns differ in length");
        goto done;
    }
    born = PyBytes_FromStringAndSize(NULL, n);
    starts_out = PyMem_Malloc((size_t)(n ? n : 1) * 3 * sizeof(int64_t));
    if (!born || !starts_out) { PyErr_NoMemory(); goto done; }
    char *b = PyBytes_AS_STRING(born);
    const uint8_t *kind = kinds.buf, *final = finals.buf, *fr = fresh.buf, *lk = linked.buf;
    const char *pathb = paths.buf;
    const int64_t *span_end = ends.buf;
    Py_ssize_t m = 0, s = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t at[2];
        memcpy(at, (const char *)index.buf + 8 * i, 8);
        if ((Py_ssize_t)at[0] + at[1] > paths.len) {
            PyErr_SetString(PyExc_ValueError, "place_records: a path lies outside the paths");
            goto done;
        }
        record_t *r = (record_t *)PyByteArray_AS_STRING(records) + i;
        Py_ssize_t off = within_name(PyByteArray_AS_STRING(heap), r, pathb + at[0], at[1]);
        if (off < 0) off = heap_add(heap, pathb + at[0], at[1]);
        if (off == -1) goto done;
        if (off == -2) { result = Py_NewRef(Py_None); goto done; }
        r = (record_t *)PyByteArray_AS_STRING(records) + i; /* (the heap moved, not the records) */
        r->path_off = (uint32_t)off;
        r->path_len = at[1];
        b[i] = 0;
        if (kind[i] == 0 && final[i] && r->size > 0) {
            r->flags |= F_WRITE;
            starts_out[m] = r->data_start;
            starts_out[n + m] = r->data_start + r->size;
            starts_out[2 * n + m] = i;
            m++;
            if (fr[i] && !lk[i]) {
                while (s + 1 < nspans && span_end[s] <= r->data_start) s++;
                if (r->data_start + r->size <= span_end[s]) {
                    b[i] = 1;
                    r->flags |= F_BORN | F_CREATABLE; /* (Python clears it for kept xattrs) */
                }
            }
        }
    }
    extents = PyBytes_FromStringAndSize(NULL, 3 * m * (Py_ssize_t)sizeof(int64_t));
    if (!extents) goto done;
    for (int c = 0; c < 3; c++)
        memcpy(PyBytes_AS_STRING(extents) + c * m * 8, starts_out + c * n, (size_t)m * 8);
    result = PyTuple_Pack(2, born, extents);
done:
    PyMem_Free(starts_out);
    Py_XDECREF(born);
    Py_XDECREF(extents);
    PyBuffer_Release(&kinds); PyBuffer_Release(&finals); PyBuffer_Release(&fresh); PyBuffer_Release(&linked);
    PyBuffer_Release(&paths); PyBuffer_Release(&index); PyBuffer_Release(&ends);
    return result;
}

PyDoc_STRVAR(skeleton_entries_doc,
"skeleton_entries(records, heap, born) -> bytes\n\n"
"The entries the skeleton of a layer must visit, as int64 indices: every entry not born with\n"
"its span (its node is made now), and the born files whose directory differs from the last\n"
"born file's since the last other entry (their parents are made now).  Why: in a layer of\n"
"small files nearly every entry is born; skipping them in C spares a Python step each.");

static PyObject *skeleton_entries(PyObject *self, PyObject *args) {
    Py_buffer recs, heapb, bornb;
    if (!PyArg_ParseTuple(args, "y*y*y*", &recs, &heapb, &bornb)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = recs.len / (Py_ssize_t)sizeof(record_t);
    int64_t *out = NULL;
    if (bornb.len != n) {
        PyErr_SetString(PyExc_ValueError, "skeleton_entries: born and the records differ in length");
        goto done;
    }
    out = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (!out) { PyErr_NoMemory(); goto done; }
    const char *heap = heapb.buf, *born = bornb.buf;
    Py_ssize_t m = 0;
    const char *made = NULL; /* the directory the born files since the last other entry are in */
    uint32_t made_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        record_t r;
        memcpy(&r, (const char *)recs.buf + i * (Py_ssize_t)sizeof(record_t), sizeof r);
        if (!born[i]) {
            out[m++] = i;
            made = NULL;
            continue;
        }
        if ((Py_ssize_t)r.path_off + r.path_len > heapb.len) {
            PyErr_SetString(PyExc_ValueError, "skeleton_entries: a path lies outside the heap");
            goto done;
        }
        const char *path = heap + r.path_off, *slash = NULL;
        for (uint32_t j = r.path_len; j > 0; j--)
            if (path[j - 1] == '/') { slash = path + j - 1; break; }
        uint32_t len = slash ? (uint32_t)(slash - path) : 0;
        if (made == NULL || len != made_len || memcmp(path, made, len) != 0) {
            out[m++] = i;
            made = path;
            made_len = len;
        }
    }
    result = PyBytes_FromStringAndSize((const char *)out, m * (Py_ssize_t)sizeof(int64_t));
done:
    PyMem_Free(out);
    PyBuffer_Release(&recs);
    PyBuffer_Release(&heapb);
    PyBuffer_Release(&bornb);
    return result;
}

PyDoc_STRVAR(skeleton_nodes_doc,
"skeleton_nodes(root_fd, records, heap, kinds, born, python, visit, at, dir_kind, reg_kind, symlink_kind) -> int\n\n"
"Make the skeleton's nodes for the entries ``visit[at:]`` (int64 indices: skeleton_entries'\n"
"output), in order, the GIL released, as LayerWriter does on paths nothing holds yet: a born\n"
"file's directory is checked to exist; a directory is made 0755 (one already there is kept); a\n"
"regular file is made 0600 (O_EXCL) and sized; a symlink is made.  Every parent is opened\n"
"beneath ``root_fd`` with no symlink followed.  Returns the position in ``visit`` of the first\n"
"entry left to Python (len(visit) when none): another kind, one ``python[i]`` marks, a record\n"
"without F_PLAIN, a path already taken, a parent missing or unsafe, any call that fails.\n"
"Python then makes that entry as before (or words its error), and calls again from the next.\n\n"
"Raises:\n"
"    ValueError: the columns differ in length, or an index or a string lies outside them.");

static PyObject *skeleton_nodes(PyObject *self, PyObject *args) {
    int root_fd, dir_kind, reg_kind, link_kind;
    Py_buffer recs, heap, kindsb, bornb, pyb, visitb;
    Py_ssize_t at;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*y*y*y*y*y*niii", &root_fd, &recs, &heap, &kindsb, &bornb, &pyb, &visitb, &at,
                          &dir_kind, &reg_kind, &link_kind))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = recs.len / (Py_ssize_t)sizeof(record_t), m = visitb.len / (Py_ssize_t)sizeof(int64_t);
    if (recs.len % (Py_ssize_t)sizeof(record_t) || kindsb.len != n || bornb.len != n || pyb.len != n ||
        visitb.len % (Py_ssize_t)sizeof(int64_t) || at < 0 || at > m) {
        PyErr_SetString(PyExc_ValueError, "skeleton_nodes: the columns differ in length");
        goto done;
    }
    const uint8_t *kinds = kindsb.buf, *born = bornb.buf, *python = pyb.buf;
    const char *visit = visitb.buf;
    for (Py_ssize_t pos = at; pos < m; pos++) { /* checked first: the loop below may not raise */
        int64_t i;
        memcpy(&i, visit + pos * (Py_ssize_t)sizeof i, sizeof i);
        if (i < 0 || i >= n) {
            PyErr_SetString(PyExc_ValueError, "skeleton_nodes: an entry index lies outside the records");
            goto done;
        }
    }
    Py_ssize_t pos = at;
    writer_t w; /* (for its cached parent directory: parent_of) */
    memset(&w, 0, sizeof w);
    w.root_fd = root_fd;
    w.parent_fd = -1;
    Py_BEGIN_ALLOW_THREADS
    static __thread char path[4096], target[4096];
    for (; pos < m; pos++) {
        int64_t i;
        memcpy(&i, visit + pos * (Py_ssize_t)sizeof i, sizeof i);
        record_t r;
        memcpy(&r, (const char *)recs.buf + i * (Py_ssize_t)sizeof(record_t), sizeof r);
        int kind = kinds[i];
        if (python[i] || !(r.flags & F_PLAIN) || !heap_string(&heap, r.path_off, r.path_len, path, sizeof path) ||
            !path[0])
            break;
        if (!born[i] && kind != dir_kind && kind != reg_kind && kind != link_kind) break;
        const char *base;
        int pfd = parent_of(&w, path, r.path_len, &base, (Py_ssize_t)i);
        if (pfd < 0) break; /* missing (Python makes it) or unsafe (Python says so) */
        if (born[i] || !*base) continue; /* a born file's directory is all the skeleton makes for it */
        if (kind == dir_kind) {
            if (mkdirat(pfd, base, 0755) < 0) {
                struct stat st;
                if (errno != EEXIST || fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode))
                    break;
            }
        } else if (kind == reg_kind) {
            if (r.size < 0) break;
            int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (fd < 0) break;
            int bad = r.size > 0 && ftruncate(fd, r.size) < 0;
            if (close(fd) < 0 || bad) break; /* Python replaces the file and sizes it again */
        } else {
            if (!heap_string(&heap, r.link_off, r.link_len, target, sizeof target) ||
                symlinkat(target, pfd, base) < 0)
                break;
        }
    }
    if (w.parent_fd >= 0) close(w.parent_fd);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(pos);
done:
    PyBuffer_Release(&recs);
    PyBuffer_Release(&heap);
    PyBuffer_Release(&kindsb);
    PyBuffer_Release(&bornb);
    PyBuffer_Release(&pyb);
    PyBuffer_Release(&visitb);
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
        int fd = openat(dir_fd, f->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, CREATE_MODE(f->mode));
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
    {"place_records", place_records, METH_VARARGS, place_records_doc},
    {"skeleton_entries", skeleton_entries, METH_VARARGS, skeleton_entries_doc},
    {"skeleton_nodes", skeleton_nodes, METH_VARARGS, skeleton_nodes_doc},
    {"toc_records", toc_records, METH_VARARGS, toc_records_doc},
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
