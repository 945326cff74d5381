/* The compiled kernels' C helpers: protobuf varints, borrowed key access, the update decoder's
 * field walkers, fast str/int construction. Included by _delta.pyx and _readindex.pyx through
 * _wire.pxd (declarations for Cython); the pure-Python twins implement the same wire rules. */
#ifndef SEQACTOR_WIRE_H
#define SEQACTOR_WIRE_H

#include <Python.h>
#include <limits.h>

/* Ask for the cache line at p ahead of its use (a hint: never faults, even on a bad address). */
static inline void sa_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* The address of a list's item array (NULL for an empty list): to prefetch it. */
static inline PyObject **sa_list_items(PyObject *list) {
    return PyList_GET_SIZE(list) > 0 ? PySequence_Fast_ITEMS(list) : NULL;
}

static inline int sa_vsize(unsigned long long v) {
    /* bytes of the varint of v: ceil(bits / 7), 1 for 0 */
    return v < 128 ? 1 : (int)((((63 - __builtin_clzll(v)) * 9) + 73) >> 6);
}

static inline char *sa_put_varint(char *p, unsigned long long v) {
    while (v >= 0x80) {
        *p++ = (char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

/* Borrowed access to the cached encoded keys (a list of bytes objects). */
static inline Py_ssize_t sa_key_len(PyObject *lst, Py_ssize_t i) {
    return PyBytes_GET_SIZE(PyList_GET_ITEM(lst, i));
}
static inline const char *sa_key_ptr(PyObject *lst, Py_ssize_t i) {
    return PyBytes_AS_STRING(PyList_GET_ITEM(lst, i));
}

/* Varint reader: NULL when truncated, longer than 10 bytes or wider than 64 bits. */
static inline __attribute__((always_inline)) const unsigned char *sa_get_varint(
    const unsigned char *p, const unsigned char *end, unsigned long long *out
) {
    unsigned long long r = 0;
    unsigned int shift = 0;
    unsigned char b;
    if (p < end && *p < 0x80) {
        *out = *p;
        return p + 1;
    }
    if (end - p >= 10) {
        /* unrolled: all 10 bytes are in bounds */
        r = p[0] & 0x7F;
#define SA_STEP(i)                                              \
        b = p[i];                                               \
        r |= (unsigned long long)(b & 0x7F) << (7 * i);         \
        if (b < 0x80) { *out = r; return p + i + 1; }
        SA_STEP(1) SA_STEP(2) SA_STEP(3) SA_STEP(4)
        SA_STEP(5) SA_STEP(6) SA_STEP(7) SA_STEP(8)
#undef SA_STEP
        b = p[9];
        if (b > 1) return NULL;  /* over 64 bits, or longer than 10 bytes */
        *out = r | ((unsigned long long)b << 63);
        return p + 10;
    }
    for (;;) {
        if (p >= end) return NULL;
        b = *p++;
        if (shift == 63 && b > 1) return NULL;
        r |= (unsigned long long)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = r;
            return p;
        }
        shift += 7;
        if (shift > 63) return NULL;
    }
}

/* str from UTF-8; ASCII (the usual id) is copied straight into a new compact str.
   NULL with UnicodeDecodeError set on invalid UTF-8. */
static inline PyObject *sa_str(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    unsigned long long acc = 0, w;
    unsigned char tail = 0;
    PyObject *s;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    for (; i < n; i++) tail |= p[i];
    if ((acc & 0x8080808080808080ULL) == 0 && (tail & 0x80) == 0) {
        s = PyUnicode_New(n, 127);
        if (s != NULL && n) memcpy(PyUnicode_1BYTE_DATA(s), p, (size_t)n);
        return s;
    }
    return PyUnicode_DecodeUTF8((const char *)p, n, NULL);
}

/* PyLong_FromLongLong has CPython's fast path for one-digit ints; the unsigned variant
   counts digits first. */
static inline PyObject *sa_u64(unsigned long long v) {
    return v <= (unsigned long long)LLONG_MAX ? PyLong_FromLongLong((long long)v)
                                              : PyLong_FromUnsignedLongLong(v);
}

/* A new, uninitialised instance of a non-GC type, without calling its __cinit__. */
static inline PyObject *sa_alloc(PyTypeObject *t) {
    return t->tp_alloc(t, 0);
}

/* Skips an unknown field's payload; NULL on truncation or an unsupported wire type. */
static inline const unsigned char *sa_skip(
    const unsigned char *p, const unsigned char *end, int wire
) {
    unsigned long long n;
    switch (wire) {
    case 0:
        return sa_get_varint(p, end, &n);
    case 1:
        return (end - p) >= 8 ? p + 8 : NULL;
    case 2:
        p = sa_get_varint(p, end, &n);
        if (p == NULL || n > (unsigned long long)(end - p)) return NULL;
        return p + n;
    case 5:
        return (end - p) >= 4 ? p + 4 : NULL;
    default:
        return NULL;
    }
}

/* Decoding errors, mapped to DecodeError messages by sa_error_message(). */
enum { SA_OK = 0, SA_EVARINT, SA_ELEN, SA_EWIRE, SA_ETAG, SA_ESKIP };

static inline __attribute__((always_inline)) const unsigned char *sa_tag(
    const unsigned char *p, const unsigned char *end, unsigned int *field, int *wire,
    int *err
) {
    unsigned long long t;
    if (*p < 0x80) {  /* callers guarantee p < end */
        t = *p++;
    } else {
        p = sa_get_varint(p, end, &t);
        if (p == NULL) { *err = SA_EVARINT; return NULL; }
        if (t > 0xFFFFFFFFULL) { *err = SA_ETAG; return NULL; }
    }
    *field = (unsigned int)(t >> 3);
    *wire = (int)(t & 7);
    if (*field == 0) { *err = SA_ETAG; return NULL; }
    return p;
}

static inline __attribute__((always_inline)) const unsigned char *sa_len(
    const unsigned char *p, const unsigned char *end, Py_ssize_t *n, int *err
) {
    unsigned long long v;
    p = sa_get_varint(p, end, &v);
    if (p == NULL) { *err = SA_EVARINT; return NULL; }
    if (v > (unsigned long long)(end - p)) { *err = SA_ELEN; return NULL; }
    *n = (Py_ssize_t)v;
    return p;
}

/* One ConversationSequence, merged into vals[0..4] (max, read, min, time, membership). */
static inline int sa_value(
    const unsigned char *p, const unsigned char *end, unsigned long long *vals
) {
    unsigned int field;
    int wire, err = SA_OK;
    while (p < end) {
        p = sa_tag(p, end, &field, &wire, &err);
        if (p == NULL) return err;
        if (field <= 5) {
            if (wire != 0) return SA_EWIRE;
            p = sa_get_varint(p, end, &vals[field - 1]);
            if (p == NULL) return SA_EVARINT;
        } else {
            p = sa_skip(p, end, wire);
            if (p == NULL) return SA_ESKIP;
        }
    }
    return SA_OK;
}

/* One map entry: the last key (*kp, *kn; *nkeys occurrences), the value merged into
   vals, *unknown set when the entry holds unknown fields of its own. */
static inline int sa_entry(
    const unsigned char *p, const unsigned char *end, const unsigned char **kp,
    Py_ssize_t *kn, int *nkeys, int *unknown, unsigned long long *vals
) {
    unsigned int field;
    int wire, err = SA_OK;
    Py_ssize_t n;
    while (p < end) {
        if (*p == 0x0A || *p == 0x12) {
            field = *p >> 3;
            wire = 2;
            p++;
        } else {
            p = sa_tag(p, end, &field, &wire, &err);
            if (p == NULL) return err;
        }
        if (field == 1 || field == 2) {
            if (wire != 2) return SA_EWIRE;
            p = sa_len(p, end, &n, &err);
            if (p == NULL) return err;
            if (field == 1) {
                *kp = p;
                *kn = n;
                (*nkeys)++;
            } else {
                err = sa_value(p, p + n, vals);
                if (err) return err;
            }
            p += n;
        } else {
            p = sa_skip(p, end, wire);
            if (p == NULL) return SA_ESKIP;
            *unknown = 1;
        }
    }
    return SA_OK;
}

/* Upper bound of the map entries at the top level (stops at the first malformed tag). */
static inline Py_ssize_t sa_count_entries(const unsigned char *p, const unsigned char *end) {
    Py_ssize_t count = 0;
    unsigned long long tag, n;
    while (p < end) {
        p = sa_get_varint(p, end, &tag);
        if (p == NULL) break;
        if (tag == 0x0A) count++;
        switch (tag & 7) {
        case 0: p = sa_get_varint(p, end, &n); break;
        case 1: p = (end - p) >= 8 ? p + 8 : NULL; break;
        case 2:
            p = sa_get_varint(p, end, &n);
            if (p == NULL || n > (unsigned long long)(end - p)) return count;
            p += n;
            break;
        case 5: p = (end - p) >= 4 ? p + 4 : NULL; break;
        default: return count;
        }
        if (p == NULL) break;
    }
    return count;
}

#endif /* SEQACTOR_WIRE_H */
