/* Tar headers to TOC entries in C, for the plain headers that make up nearly every layer:
 * what prewarm.index.tarindex._parse_chain returns for them, for a run of them at once.
 *
 * Why: a layer that lands whole (no SOCI index) and a zTOC that is built both parse every
 * tar header of the layer.  In Python that was ~9 us per entry (0.6 s of the landing
 * thread for the bench's 69,000-file layer, ~9 s for a layer of a million files), the
 * largest share of the thread that a whole layer waits on.
 *
 * Only the plain case is taken here: one ustar or GNU header, alone or after an extended
 * header that holds only a "path" record (how Go writes a long name), of a type SOCI
 * indexes, whole in the buffer (no other PAX record, no GNU long name, no STAR or v7
 * header, no base-256 or odd number field, the checksum its unsigned sum, no GNU
 * atime/ctime: see _tarheader.h).  At anything else the
 * run stops and hands the position back to the Python parser, which takes that header
 * chain (or words its error) and calls again after it.  So an entry returned here is the
 * one Python would return, which tests/test_tarindex.py checks on mutated archives.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "_tarheader.h"

#define BLOCK TAR_BLOCK

static PyObject *text(const uint8_t *p, size_t len) {
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "surrogateescape");
}

/* tarindex.format_mod_time(secs, 0) for 0 <= secs < 8**12 (a plain octal mtime field): RFC 3339
 * in UTC.  (Python writes "" past year 9999, which 12 octal digits do not reach: 4147.) */
static PyObject *mod_time(int64_t secs) {
    int64_t days = secs / 86400, rem = secs % 86400;
    int64_t z = days + 719468, era = z / 146097, doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t y = yoe + era * 400, doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153, d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9;
    if (m <= 2) y++;
    char out[32];
    int len = snprintf(out, sizeof out, "%04d-%02d-%02dT%02d:%02d:%02dZ", (int)y, (int)m, (int)d,
                       (int)(rem / 3600), (int)(rem / 60 % 60), (int)(rem % 60));
    return PyUnicode_FromStringAndSize(out, len);
}

static const char *type_names[7] = {"reg", "hardlink", "symlink", "char", "block", "dir", "fifo"};
static PyObject *types[7]; /* interned at module init */

/* FileEntry's fields in order, and their slot descriptors once looked up. */
static const char *field_names[14] = {"name", "type", "uncompressed_offset", "uncompressed_size", "linkname", "mode",
                                      "uid", "gid", "uname", "gname", "mod_time", "devmajor", "devminor", "xattrs"};
static PyObject *slots_of, *slots[14];

/* A FileEntry of these field values.  Why not a call of the class: the frozen dataclass's
 * __init__ sets each field through object.__setattr__ in Python, ~1.5 us per entry, more
 * than the rest of the header's parse; its slots are set here directly (all that __init__
 * does), or the class is called where it has no such slots or its __init__ does more (a
 * __post_init__). */
static PyObject *new_entry(PyObject *entry_type, PyObject *const *args) {
    if (slots_of != entry_type) {
        int usable = PyType_Check(entry_type) && !PyObject_HasAttrString(entry_type, "__post_init__");
        for (int i = 0; i < 14; i++) {
            Py_CLEAR(slots[i]);
            PyObject *d = usable ? PyObject_GetAttrString(entry_type, field_names[i]) : NULL;
            if (!d) PyErr_Clear();
            usable = usable && d && Py_IS_TYPE(d, &PyMemberDescr_Type);
            slots[i] = d;
        }
        if (!usable)
            for (int i = 0; i < 14; i++) Py_CLEAR(slots[i]);
        Py_XSETREF(slots_of, Py_NewRef(entry_type));
    }
    if (!slots[0]) return PyObject_Vectorcall(entry_type, args, 14, NULL);
    PyTypeObject *t = (PyTypeObject *)entry_type;
    PyObject *e = t->tp_alloc(t, 0);
    if (!e) return NULL;
    for (int i = 0; i < 14; i++)
        if (Py_TYPE(slots[i])->tp_descr_set(slots[i], e, args[i]) < 0) {
            Py_DECREF(e);
            return NULL;
        }
    return e;
}

/* A type SOCI indexes ('0'..'6', or the legacy NUL); x g L K S 7 ...: Python. */
static int entry_flag(int flag) { return flag == 0 || (flag >= '0' && flag <= '6'); }

/* The entry of the plain header h at blk, its name the PAX path when one is given (a
 * record with an empty value keeps the header's name, and is kept as a record). */
static PyObject *make_entry(const uint8_t *blk, const tar_header_t *h, const uint8_t *pax, int64_t pax_len,
                            int64_t data_at, PyObject *entry_type, int64_t *data_len, int64_t *last_mtime,
                            PyObject **last_mod) {
    uint8_t joined[256];
    const uint8_t *name = joined;
    size_t name_len = cstrlen(blk, 100);
    if (pax && pax_len) {
        name = pax;
        name_len = (size_t)pax_len;
    } else {
        size_t prefix_len = h->ustar ? cstrlen(blk + 345, 155) : 0, at = 0;
        if (prefix_len) {
            memcpy(joined, blk + 345, prefix_len);
            joined[prefix_len] = '/';
            at = prefix_len + 1;
        }
        memcpy(joined + at, blk, name_len);
        name_len += at;
    }
    int flag = h->flag;
    if (flag == 0) flag = name_len && name[name_len - 1] == '/' ? '5' : '0';
    *data_len = flag == '0' ? h->size : 0;
    if (*last_mod == NULL || *last_mtime != h->mtime) {
        PyObject *formatted = mod_time(h->mtime);
        if (!formatted) return NULL;
        Py_XSETREF(*last_mod, formatted);
        *last_mtime = h->mtime;
    }
    PyObject *records = NULL;
    if (pax) {
        PyObject *value = text(pax, (size_t)pax_len);
        PyObject *record = value ? Py_BuildValue("(sN)", "path", value) : NULL;
        records = record ? PyTuple_Pack(1, record) : NULL;
        Py_XDECREF(record);
    } else {
        records = PyTuple_New(0);
    }
    PyObject *args[14] = {
        text(name, name_len), Py_NewRef(types[flag - '0']), PyLong_FromLongLong(data_at),
        PyLong_FromLongLong(h->size), text(blk + 157, cstrlen(blk + 157, 100)), PyLong_FromLongLong(h->mode),
        PyLong_FromLongLong(h->uid & 0xFFFFFFFF), PyLong_FromLongLong(h->gid & 0xFFFFFFFF),
        text(blk + 265, cstrlen(blk + 265, 32)), text(blk + 297, cstrlen(blk + 297, 32)), Py_NewRef(*last_mod),
        PyLong_FromLongLong(h->dmaj), PyLong_FromLongLong(h->dmin), records,
    };
    PyObject *entry = NULL;
    int ok = 1;
    for (int i = 0; i < 14; i++) ok &= args[i] != NULL;
    if (ok) entry = new_entry(entry_type, args);
    for (int i = 0; i < 14; i++) Py_XDECREF(args[i]);
    return entry;
}

/* The entry of the header chain at buf[pos] (a plain header, or one PAX path record and a
 * plain header), whole in buf[0:n]; Py_None (a new reference) when Python must take it;
 * NULL on error.  *data_pos: where its data starts; *data_len: its data's length. */
static PyObject *plain_chain(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t n, long long base, PyObject *entry_type,
                             Py_ssize_t *data_pos, int64_t *data_len, int64_t *last_mtime, PyObject **last_mod) {
    tar_header_t h;
    if (!plain_header(buf + pos, &h)) Py_RETURN_NONE;
    const uint8_t *pax = NULL;
    int64_t pax_len = 0;
    if (h.flag == 'x') {
        Py_ssize_t body = pos + BLOCK;
        if (h.size > n - body || !path_record(buf + body, h.size, &pax, &pax_len)) Py_RETURN_NONE;
        pos = body + (Py_ssize_t)(h.size + (-h.size & (BLOCK - 1)));
        if (pos > n - BLOCK || !plain_header(buf + pos, &h)) Py_RETURN_NONE;
    }
    if (!entry_flag(h.flag)) Py_RETURN_NONE;
    *data_pos = pos + BLOCK;
    return make_entry(buf + pos, &h, pax, pax_len, base + pos + BLOCK, entry_type, data_len, last_mtime, last_mod);
}

PyDoc_STRVAR(parse_plain_doc,
"parse_plain(buf, pos, base, FileEntry) -> (entries, pos, skip, pad)\n\n"
"Parse the run of plain header chains (a plain header, or one PAX path record and a plain header) starting at the header boundary ``buf[pos]`` (stream\n"
"offset ``base + pos``), skipping each entry's data and padding, until a header Python must\n"
"take (returned ``pos`` is where it starts) or the end of ``buf`` (``pos`` is len(buf), and\n"
"``skip``/``pad`` say how much of the last entry's data and padding lie beyond it).  A zero\n"
"block and a header cut by the end of ``buf`` are left to Python too.");

static PyObject *parse_plain(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    long long base;
    PyObject *entry_type;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nLO", &view, &pos, &base, &entry_type)) return NULL;
    const uint8_t *buf = view.buf;
    Py_ssize_t n = view.len;
    PyObject *out = NULL, *result = NULL, *last_mod = NULL;
    int64_t last_mtime = -1, skip = 0, pad = 0;
    if (pos < 0 || pos > n) {
        PyErr_SetString(PyExc_ValueError, "parse_plain: pos lies outside the buffer");
        goto done;
    }
    out = PyList_New(0);
    if (!out) goto done;
    while (pos <= n - BLOCK) { /* (a zero block is no plain header: Python takes the archive's end) */
        int64_t data_len = 0;
        Py_ssize_t data_pos = 0;
        PyObject *e = plain_chain(buf, pos, n, base, entry_type, &data_pos, &data_len, &last_mtime, &last_mod);
        if (!e) goto done;
        if (e == Py_None) {
            Py_DECREF(e);
            break;
        }
        int appended = PyList_Append(out, e);
        Py_DECREF(e);
        if (appended < 0) goto done;
        int64_t padding = -data_len & (BLOCK - 1), left = n - data_pos;
        if (data_len + padding > left) { /* the data (or its padding) runs past the buffer */
            skip = data_len < left ? 0 : data_len - left;
            pad = padding - (left - (data_len - skip));
            pos = n;
            break;
        }
        pos = data_pos + (Py_ssize_t)(data_len + padding);
    }
    result = Py_BuildValue("(OnLL)", out, pos, (long long)skip, (long long)pad);
done:
    Py_XDECREF(out);
    Py_XDECREF(last_mod);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"parse_plain", parse_plain, METH_VARARGS, parse_plain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "prewarm.index._tarindex", "Plain tar headers parsed in C (see prewarm.index.tarindex).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarindex(void) {
    for (int i = 0; i < 7; i++)
        if (!types[i] && !(types[i] = PyUnicode_InternFromString(type_names[i]))) return NULL;
    return PyModule_Create(&module);
}
