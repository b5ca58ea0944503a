/* Placeholder replaced by the C checker (see prewarm.store.layerfs.EntryChecker). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "prewarm.store._tree", "The layer-tree check of a TOC in C.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tree(void) { return PyModule_Create(&module); }
