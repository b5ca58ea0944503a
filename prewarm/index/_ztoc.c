/* Decoding a zTOC's TOC entries in C: what prewarm.index.ztoc._read_entry does for a
 * well-formed entry, for a whole vector at once.
 *
 * Why: every TOC entry of a layer is decoded before its first span lands (the scheduler
 * checks the whole archive, a worker preparing a layer ahead does too); in Python that
 * was ~20 us per entry, about a second for the bench's 51,000-entry layer.  The checks
 * are the Python decoder's, in the same terms (a field ends inside its table, a table
 * inside the buffer, a string inside the buffer and within its limit, names and types
 * as ztoc._read_entry wants them, the decoding budget); anything that fails one comes
 * back as None and the Python decoder decodes it again and names what is wrong.  So
 * an entry C returns is the one Python would, which tests/test_ztoc_parse.py checks on
 * mutated golden zTOCs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_flatbuf.h"

#define MAX_NAME_BYTES (1 << 16)  /* ztoc._MAX_NAME_BYTES */
#define MAX_SHORT_STRING (1 << 12) /* ztoc._MAX_SHORT_STRING */
#define ENTRY_COST 256             /* ztoc._ENTRY_COST */
#define XATTR_COST 128             /* ztoc._XATTR_COST */

static PyObject *text(const uint8_t *p, int64_t len) {
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "surrogateescape");
}

/* Whether a name has a ".." component (it could escape the layer): ztoc._check_name. */
static int dotdot_component(const uint8_t *p, int64_t len) {
    int64_t start = 0;
    for (int64_t i = 0; i <= len; i++) {
        if (i == len || p[i] == '/') {
            if (i - start == 2 && p[start] == '.' && p[start + 1] == '.') return 1;
            start = i + 1;
        }
    }
    return 0;
}

/* An entry's xattr pairs as a tuple, adding their cost to *cost (at most `allowance`
 * in all): ztoc._read_xattrs.  NULL without an exception when Python must judge. */
static PyObject *xattrs_at(const buf_t *B, int64_t at, int64_t allowance, int64_t *cost) {
    static const int widths[2] = {4, 4};
    int64_t v = at + u32(B, at);
    if (v > B->n - 4) return NULL;
    int64_t count = u32(B, v);
    if (count * 4 > B->n - v - 4) return NULL;
    if (*cost + count * XATTR_COST > allowance) return NULL;
    *cost += count * XATTR_COST;
    PyObject *pairs = PyTuple_New((Py_ssize_t)count);
    if (!pairs) return NULL;
    for (int64_t j = 0; j < count; j++) {
        int64_t ref = v + 4 + 4 * j, f[2];
        const uint8_t *kp, *vp;
        int64_t kl, vl;
        if (!table_fields(B, ref + u32(B, ref), 2, widths, f)) goto unsure;
        if (!string_at(B, f[0], MAX_SHORT_STRING, &kp, &kl)) goto unsure;
        if (!string_at(B, f[1], MAX_NAME_BYTES, &vp, &vl)) goto unsure;
        *cost += kl + vl;
        if (*cost > allowance) goto unsure;
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

/* One entry, adding its cost to *cost when it is decoded; Py_None (a new reference) when
 * the Python decoder must take it (malformed, or over `allowance`), NULL on error. */
static PyObject *decode_one(const buf_t *B, int64_t t, PyObject *entry_type, PyObject *types,
                            int64_t allowance, int64_t *spent) {
    static const int widths[14] = {4, 4, 8, 8, 4, 8, 4, 4, 4, 4, 4, 8, 8, 4};
    int64_t o[14];
    if (!table_fields(B, t, 14, widths, o)) Py_RETURN_NONE;
    /* strings: name, type, linkname, uname, gname, mod_time */
    static const int idx[6] = {0, 1, 4, 8, 9, 10};
    static const int64_t limit[6] = {MAX_NAME_BYTES, 16, MAX_NAME_BYTES, MAX_SHORT_STRING, MAX_SHORT_STRING, 64};
    const uint8_t *sp[6];
    int64_t sl[6];
    for (int i = 0; i < 6; i++)
        if (!string_at(B, o[idx[i]], limit[i], &sp[i], &sl[i])) Py_RETURN_NONE;
    if (sl[0] == 0 || memchr(sp[0], 0, (size_t)sl[0]) || memchr(sp[2], 0, (size_t)sl[2])) Py_RETURN_NONE;
    if (dotdot_component(sp[0], sl[0])) Py_RETURN_NONE; /* Python names it */
    int64_t cost = ENTRY_COST + sl[0] + sl[2] + sl[3] + sl[4] + sl[5];
    int64_t left = allowance - *spent;
    if (cost > left) Py_RETURN_NONE;
    /* integers: offset, size, mode, devmajor, devminor (int64); uid, gid (uint32) */
    static const int iidx[5] = {2, 3, 5, 11, 12};
    int64_t ints[5];
    for (int i = 0; i < 5; i++) {
        ints[i] = 0;
        if (o[iidx[i]]) memcpy(&ints[i], B->b + o[iidx[i]], 8);
    }
    uint32_t uid = o[6] ? u32(B, o[6]) : 0, gid = o[7] ? u32(B, o[7]) : 0;
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
        xattrs = xattrs_at(B, o[13], left, &cost);
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
    if (entry) *spent += cost;
    return entry;
}

PyDoc_STRVAR(decode_entries_doc,
"decode_entries(buf, start, count, FileEntry, types, allowance) -> (list[FileEntry | None], spent)\n\n"
"Decode the TOC vector of `count` table references at `start`; None where the Python\n"
"decoder must take the entry (anything not plainly well-formed, or past what is left\n"
"of `allowance`, the decoding budget).  `types` maps the raw type strings to their\n"
"names; `spent` is what the decoded entries cost (ztoc._read_entry's measure).");

static PyObject *decode_entries(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, count;
    long long allowance;
    PyObject *entry_type, *types;
    if (!PyArg_ParseTuple(args, "y*nnOO!L", &view, &start, &count, &entry_type, &PyDict_Type, &types,
                          &allowance))
        return NULL;
    buf_t B = {view.buf, view.len};
    PyObject *out = NULL, *result = NULL;
    int64_t spent = 0;
    if (start < 0 || count < 0 || count > (B.n - start) / 4) {
        PyErr_SetString(PyExc_ValueError, "TOC vector lies outside the buffer");
        goto done;
    }
    out = PyList_New(count);
    if (!out) goto done;
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t at = start + 4 * (int64_t)k;
        PyObject *e = decode_one(&B, at + u32(&B, at), entry_type, types, allowance, &spent);
        if (!e) goto done;
        PyList_SET_ITEM(out, k, e);
    }
    result = Py_BuildValue("(OL)", out, (long long)spent);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return result;
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
