/* A plain tar header read in C, as prewarm.index.tarindex reads the common case: shared by
 * the modules that take plain headers and leave the rest to Python, which words the errors
 * (prewarm/index/_tarindex.c parses them into TOC entries, prewarm/store/_landing.c checks
 * a span's headers against the TOC).  A check that fails returns 0: "Python decides".
 */
#ifndef PREWARM_TARHEADER_H
#define PREWARM_TARHEADER_H
#include <stdint.h>
#include <string.h>

#define TAR_BLOCK 512
/* tarindex.MAX_SPECIAL_FILE_SIZE: Go refuses an extended header above it (Python's error). */
#define TAR_MAX_SPECIAL_FILE_SIZE (1 << 20)

/* A numeric field as plain octal, as Go's parseOctal takes the common case: spaces and
 * NULs trimmed on both sides, then only octal digits (at most 21: below 2**63).  Anything
 * else (base-256, an inner NUL, digits 8/9) returns 0. */
static inline int plain_octal(const uint8_t *f, int n, int64_t *out) {
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

static inline size_t cstrlen(const uint8_t *p, size_t n) {
    const uint8_t *z = memchr(p, 0, n);
    return z ? (size_t)(z - p) : n;
}

/* The block's checksum is its unsigned sum (the signed one, which Go also takes, is rare). */
static inline int checksum_ok(const uint8_t *blk) {
    int64_t chk;
    if (!plain_octal(blk + 148, 8, &chk)) return 0;
    int64_t sum = 8 * ' ';
    for (int i = 0; i < TAR_BLOCK; i++)
        if (i < 148 || i >= 156) sum += blk[i];
    return chk == sum;
}

/* A plain header's fields: `ustar` (else GNU), the type flag, its seven numbers. */
typedef struct {
    int ustar, flag;
    int64_t mode, uid, gid, size, mtime, dmaj, dmin;
} tar_header_t;

/* 1 when blk is a plain header: its checksum the unsigned sum, ustar (not STAR: atime and
 * ctime) or GNU without atime/ctime (nor a pre-Go 1.8 prefix there), and its seven numbers
 * plain octal (Go parses them in every header, whatever its type).  Never a zero block (the
 * archive's end): its sum is 256, its checksum field 0. */
static inline int plain_header(const uint8_t *blk, tar_header_t *h) {
    if (!checksum_ok(blk)) return 0;
    h->ustar = memcmp(blk + 257, "ustar\0", 6) == 0;
    if (h->ustar) {
        if (memcmp(blk + 508, "tar\0", 4) == 0) return 0;
    } else if (memcmp(blk + 257, "ustar ", 6) != 0 || blk[263] != ' ' || blk[264] != 0 || blk[345] || blk[357]) {
        return 0; /* v7, or GNU with atime/ctime */
    }
    h->flag = blk[156];
    return plain_octal(blk + 100, 8, &h->mode) && plain_octal(blk + 108, 8, &h->uid) &&
           plain_octal(blk + 116, 8, &h->gid) && plain_octal(blk + 124, 12, &h->size) &&
           plain_octal(blk + 136, 12, &h->mtime) && plain_octal(blk + 329, 8, &h->dmaj) &&
           plain_octal(blk + 337, 8, &h->dmin);
}

/* An extended header's payload when it is one "path" record, as Go writes a long name
 * (tarindex._parse_chain's size bound and _parse_pax's checks for that one record); *value
 * is the path, NUL-free. */
static inline int path_record(const uint8_t *p, int64_t size, const uint8_t **value, int64_t *len) {
    if (size > TAR_MAX_SPECIAL_FILE_SIZE) return 0;
    int64_t i = 0, n = 0;
    while (i < size && i < 8 && p[i] >= '0' && p[i] <= '9') n = n * 10 + (p[i++] - '0');
    if (i == 0 || i >= size || p[i] != ' ' || n != size || n < 5) return 0;
    if (size - i < 7 || memcmp(p + i + 1, "path=", 5) != 0 || p[size - 1] != '\n') return 0;
    *value = p + i + 6;
    *len = size - 1 - (i + 6);
    return memchr(*value, 0, (size_t)*len) == NULL;
}

#endif
