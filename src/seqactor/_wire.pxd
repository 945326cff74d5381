# cython: language_level=3
"""Cython declarations of the C helpers in ``_wire.h`` (shared by the compiled kernels)."""

from cpython.object cimport PyObject

cdef extern from "_wire.h":
    void sa_prefetch(const void *p) noexcept nogil
    PyObject **sa_list_items(PyObject *lst) noexcept
    int sa_vsize(unsigned long long v) noexcept nogil
    char *sa_put_varint(char *p, unsigned long long v) noexcept nogil
    Py_ssize_t sa_key_len(list lst, Py_ssize_t i) noexcept
    const char *sa_key_ptr(list lst, Py_ssize_t i) noexcept
    const unsigned char *sa_get_varint(
        const unsigned char *p, const unsigned char *end, unsigned long long *out
    ) noexcept nogil
    const unsigned char *sa_skip(const unsigned char *p, const unsigned char *end, int wire) noexcept nogil
    object sa_str(const unsigned char *p, Py_ssize_t n)
    object sa_u64(unsigned long long v)
    object sa_alloc(type t)
    Py_ssize_t sa_count_entries(const unsigned char *p, const unsigned char *end) noexcept nogil
    const unsigned char *sa_len(
        const unsigned char *p, const unsigned char *end, Py_ssize_t *n, int *err
    ) noexcept nogil
    int sa_entry(
        const unsigned char *p, const unsigned char *end, const unsigned char **kp,
        Py_ssize_t *kn, int *nkeys, int *unknown, unsigned long long *vals
    ) noexcept nogil
    enum:
        SA_OK
        SA_EVARINT
        SA_ELEN
        SA_EWIRE
        SA_ETAG
        SA_ESKIP
    dict _PyDict_NewPresized(Py_ssize_t minused)

