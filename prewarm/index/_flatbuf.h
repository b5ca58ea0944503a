/* Reading a zTOC flatbuffer in C, every offset checked against the buffer: what
 * prewarm.index.ztoc._Reader does, shared by the C modules that walk a TOC
 * (prewarm/index/_ztoc.c, prewarm/store/_landing.c, prewarm/store/_tree.c).
 * A check that fails returns 0: the caller leaves the entry to Python, which names it.
 */
#ifndef PREWARM_FLATBUF_H
#define PREWARM_FLATBUF_H
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    const uint8_t *b;
    int64_t n;
} buf_t;

static inline uint32_t u32(const buf_t *B, int64_t at) {
    uint32_t v;
    memcpy(&v, B->b + at, 4);
    return v;
}

static inline int32_t i32(const buf_t *B, int64_t at) {
    int32_t v;
    memcpy(&v, B->b + at, 4);
    return v;
}

static inline uint16_t u16(const buf_t *B, int64_t at) {
    uint16_t v;
    memcpy(&v, B->b + at, 2);
    return v;
}

/* The absolute positions of a table's `count` fields (0 when absent) into `pos`, each
 * ending inside the table (`widths`), the table inside the buffer: ztoc._table_fields.
 * 0 when Python must judge. */
static inline int table_fields(const buf_t *B, int64_t t, int count, const int *widths, int64_t *pos) {
    if (t < 0 || t > B->n - 4) return 0;
    int64_t vt = t - i32(B, t);
    if (vt < 0 || vt > B->n - 4) return 0;
    int64_t vsize = u16(B, vt), tsize = u16(B, vt + 2);
    if (vt + vsize > B->n || t + tsize > B->n || tsize < 4) return 0;
    int64_t k = vsize < 4 ? 0 : (vsize - 4) / 2;
    if (k > count) k = count;
    for (int i = 0; i < count; i++) {
        int64_t off = i < k ? u16(B, vt + 4 + 2 * i) : 0;
        if (off && off + widths[i] > tsize) return 0;
        pos[i] = off ? t + off : 0;
    }
    return 1;
}

/* The string referenced at `at` (empty when `at` is 0), if it lies in the buffer and is
 * at most `limit` bytes: ztoc._Reader.string_at. */
static inline int string_at(const buf_t *B, int64_t at, int64_t limit, const uint8_t **p, int64_t *len) {
    *p = (const uint8_t *)"";
    *len = 0;
    if (!at) return 1;
    if (at < 0 || at > B->n - 4) return 0;
    int64_t v = at + u32(B, at);
    if (v > B->n - 4) return 0;
    int64_t length = u32(B, v);
    if (length > B->n - v - 4 || length > limit) return 0;
    *p = B->b + v + 4;
    *len = length;
    return 1;
}

/* The table of TOC entry k (the vector of `count` references at `start`), or -1 when the
 * reference lies outside the buffer. */
static inline int64_t toc_entry_at(const buf_t *B, int64_t start, int64_t k) {
    int64_t at = start + 4 * k;
    if (at < 0 || at > B->n - 4) return -1;
    return at + u32(B, at);
}

/* How many entries a pass over a TOC that maps a file reads between two give_back_all calls:
 * a million entries are ~190 MB of zTOC, and a pass touches it all. */
#define GIVE_BACK_EVERY 65536

/* Drop every page of B from this process (B must map a file: MADV_DONTNEED drops the pages of
 * a file mapping from this process and the page cache keeps them; on anonymous memory it would
 * zero them).  Why the whole buffer: a builder may put the entries' strings far from their
 * tables, so no range behind the pass can be said to be done with; a page read again after
 * this is a minor fault from the page cache. */
static inline void give_back_all(const buf_t *B) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)B->b + page - 1) & ~(page - 1), b = (uintptr_t)(B->b + B->n) & ~(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

#endif
