/* Decoding a zTOC's TOC entries in C: what prewarm.index.ztoc._read_entry does for a
 * well-formed entry, for a whole vector at once.
 *
 * Why: every TOC entry of a layer is decoded before its first span lands (the scheduler
 * checks the whole archive, a worker preparing a layer ahead does too); in Python that
 * was ~25 us per entry, 1.3 s for the bench's 51,000-entry layer.  Anything this code
 * does not accept as plainly well-formed comes back as None, and the Python decoder
 * decodes it (and names what is wrong): the two agree on every input by construction,
 * which tests/test_ztoc_parse.py checks on mutated golden zTOCs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_NAME_BYTES (1 << 16)  /* ztoc._MAX_NAME_BYTES */
#define MAX_SHORT_STRING (1 << 12) /* ztoc._MAX_SHORT_STRING */

typedef struct {
    const uint8_t *b;
    int64_t n;
} buf_t;

static uint32_t u32(const buf_t *B, int64_t at) {
    uint32_t v;
    memcpy(&v, B->b + at, 4);
    return v;
}

static int32_t i32(const buf_t *B, int64_t at) {
    int32_t v;
    memcpy(&v, B->b + at, 4);
    return v;
}

static uint16_t u16(const buf_t *B, int64_t at) {
    uint16_t v;
    memcpy(&v, B->b + at, 2);
    return v;
}

/* The string referenced at `at`, if it lies in the buffer and is at most `limit` bytes. */
static int quick_string(const buf_t *B, int64_t at, int64_t limit, const uint8_t **p, int64_t *len) {
    if (at < 0 || at > B->n - 4) return 0;
    int64_t v = at + u32(B, at);
    if (v > B->n - 4) return 0;
    int64_t length = u32(B, v);
    if (length > limit || length > B->n - v - 4) return 0;
    *p = B->b + v + 4;
    *len = length;
    return 1;
}

static PyObject *text(const uint8_t *p, int64_t len) {
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "surrogateescape");
}

/* An entry's xattr pairs as a tuple; NULL without an exception when Python must judge. */
static PyObject *quick_xattrs(const buf_t *B, int64_t at) {
    if (at > B->n - 4) return NULL;
    int64_t v = at + u32(B, at);
    if (v > B->n - 4) return NULL;
    int64_t count = u32(B, v);
    if (count * 4 > B->n - v - 4) return NULL;
    PyObject *pairs = PyTuple_New((Py_ssize_t)count);
    if (!pairs) return NULL;
    for (int64_t j = 0; j < count; j++) {
        int64_t ref = v + 4 + 4 * j;
        int64_t t = ref + u32(B, ref);
        if (t > B->n - 4) goto unsure;
        int64_t vt = t - i32(B, t);
        if (vt < 0 || vt > B->n - 8) goto unsure;
        int64_t vsize = u16(B, vt), tsize = u16(B, vt + 2);
        if (vsize < 8 || vt + vsize > B->n || t + tsize > B->n - 4 || tsize < 4) goto unsure;
        int64_t ko = u16(B, vt + 4), vo = u16(B, vt + 6);
        if (ko >= tsize || vo >= tsize) goto unsure;
        const uint8_t *kp = (const uint8_t *)"", *vp = (const uint8_t *)"";
        int64_t kl = 0, vl = 0;
        if (ko && !quick_string(B, t + ko, MAX_SHORT_STRING, &kp, &kl)) goto unsure;
        if (vo && !quick_string(B, t + vo, MAX_NAME_BYTES, &vp, &vl)) goto unsure;
        PyObject *key = text(kp, kl), *value = key ? text(vp, vl) : NULL;
        PyObject *pair = value ? PyTuple_Pack(2, key, value) : NULL;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (!pair) {
            Py_DECREF(pairs);
            return NULL;
        }
        PyTuple_SET_ITEM(pairs, (Py_ssize_t)j, pair);
    }
    return pairs;
unsure:
    Py_DECREF(pairs);
    return NULL;
}

/* One entry; Py_None (a new reference) when the Python decoder must take it, NULL on error. */
static PyObject *decode_one(const buf_t *B, int64_t t, PyObject *entry_type, PyObject *types) {
    if (t < 0 || t > B->n - 4) Py_RETURN_NONE;
    int64_t vt = t - i32(B, t);
    if (vt < 0 || vt > B->n - 4) Py_RETURN_NONE;
    int64_t vsize = u16(B, vt), tsize = u16(B, vt + 2);
    int64_t k = vsize < 4 ? -1 : (vsize - 4) / 2;
    if (k > 14) k = 14;
    if (k < 2 || vt + vsize > B->n || t + tsize > B->n - 4 || tsize < 4) Py_RETURN_NONE;
    int64_t o[14] = {0};
    for (int64_t i = 0; i < k; i++) {
        o[i] = u16(B, vt + 4 + 2 * i);
        if (o[i] >= tsize) Py_RETURN_NONE;
    }
    /* strings: name, type, linkname, uname, gname, mod_time */
    static const int idx[6] = {0, 1, 4, 8, 9, 10};
    static const int64_t limit[6] = {MAX_NAME_BYTES, 16, MAX_NAME_BYTES, MAX_SHORT_STRING, MAX_SHORT_STRING, 64};
    const uint8_t *sp[6];
    int64_t sl[6];
    for (int i = 0; i < 6; i++) {
        sp[i] = (const uint8_t *)"";
        sl[i] = 0;
        if (o[idx[i]] && !quick_string(B, t + o[idx[i]], limit[i], &sp[i], &sl[i])) Py_RETURN_NONE;
    }
    if (sl[0] == 0 || memchr(sp[0], 0, (size_t)sl[0]) || memchr(sp[2], 0, (size_t)sl[2])) Py_RETURN_NONE;
    for (int64_t i = 0; i + 1 < sl[0]; i++)
        if (sp[0][i] == '.' && sp[0][i + 1] == '.') Py_RETURN_NONE; /* Python names it or accepts it */
    /* integers: offset, size, mode, devmajor, devminor (int64); uid, gid (uint32) */
    static const int iidx[5] = {2, 3, 5, 11, 12};
    int64_t ints[5];
    for (int i = 0; i < 5; i++) {
        ints[i] = 0;
        if (o[iidx[i]]) {
            if (t + o[iidx[i]] > B->n - 8) Py_RETURN_NONE;
            memcpy(&ints[i], B->b + t + o[iidx[i]], 8);
        }
    }
    uint32_t uid = 0, gid = 0;
    if (o[6]) uid = u32(B, t + o[6]);
    if (o[7]) gid = u32(B, t + o[7]);
    PyObject *type_raw = PyBytes_FromStringAndSize((const char *)sp[1], (Py_ssize_t)sl[1]);
    if (!type_raw) return NULL;
    PyObject *type_name = PyDict_GetItemWithError(types, type_raw); /* borrowed */
    Py_DECREF(type_raw);
    if (!type_name) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *xattrs;
    if (o[13]) {
        xattrs = quick_xattrs(B, t + o[13]);
        if (!xattrs) {
            if (PyErr_Occurred()) return NULL;
            Py_RETURN_NONE;
        }
    } else {
        xattrs = PyTuple_New(0);
        if (!xattrs) return NULL;
    }
    PyObject *args[14] = {
        text(sp[0], sl[0]), Py_NewRef(type_name), PyLong_FromLongLong(ints[0]), PyLong_FromLongLong(ints[1]),
        text(sp[2], sl[2]), PyLong_FromLongLong(ints[2]), PyLong_FromUnsignedLong(uid),
        PyLong_FromUnsignedLong(gid), text(sp[3], sl[3]), text(sp[4], sl[4]), text(sp[5], sl[5]),
        PyLong_FromLongLong(ints[3]), PyLong_FromLongLong(ints[4]), xattrs,
    };
    PyObject *entry = NULL;
    int ok = 1;
    for (int i = 0; i < 14; i++)
        if (!args[i]) ok = 0;
    if (ok) entry = PyObject_Vectorcall(entry_type, args, 14, NULL);
    for (int i = 0; i < 14; i++) Py_XDECREF(args[i]);
    return entry;
}

PyDoc_STRVAR(decode_entries_doc,
"decode_entries(buf, start, count, FileEntry, types) -> list[FileEntry | None]\n\n"
"Decode the TOC vector of `count` table references at `start`; None where the Python\n"
"decoder must take the entry (anything not plainly well-formed).  `types` maps the raw\n"
"type strings to their names.");

static PyObject *decode_entries(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, count;
    PyObject *entry_type, *types;
    if (!PyArg_ParseTuple(args, "y*nnOO!", &view, &start, &count, &entry_type, &PyDict_Type, &types)) return NULL;
    buf_t B = {view.buf, view.len};
    PyObject *out = NULL;
    if (start < 0 || count < 0 || count > (B.n - start) / 4) {
        PyErr_SetString(PyExc_ValueError, "TOC vector lies outside the buffer");
        goto done;
    }
    out = PyList_New(count);
    if (!out) goto done;
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t at = start + 4 * (int64_t)k;
        PyObject *e = decode_one(&B, at + u32(&B, at), entry_type, types);
        if (!e) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, k, e);
    }
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"decode_entries", decode_entries, METH_VARARGS, decode_entries_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "prewarm.index._ztoc", "zTOC entry decoding in C (see prewarm.index.ztoc).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ztoc(void) { return PyModule_Create(&module); }
