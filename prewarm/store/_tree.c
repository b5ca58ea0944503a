/* The layer-tree check of a whole TOC in C: what prewarm.store.layerfs.check_archive
 * computes for the entries of a zTOC (parse_ztoc(buf, lazy_files=True).files), read
 * straight from the flatbuffer, with no Python object per entry.
 *
 * Why: preparing a layer of 1,000,000 files took 1.4 GB, most of it EntryChecker's dicts
 * keyed by every path and a Placement per entry, fed with a decoded FileEntry per entry.
 * Here a path is interned once in a byte arena (which becomes the `paths` column), found
 * through an open-addressing table of record ids, and a record holds what the Python
 * checker keeps in its dicts (kind, last entry, node entry) plus what the subtree
 * forgetting needs: about 40 bytes per entry beyond the columns returned (measured on
 * 200,000 entries; the columns are 12 bytes per entry and the path bytes).  The growing
 * arrays are anonymous mappings grown by mremap: a realloc on the heap leaves each
 * outgrown copy resident, about doubling the peak.
 *
 * The rule: never a wrong answer.  Whenever check_archive(ztoc.files, archive_size) would
 * raise, and for anything this file does not handle, check_toc returns None and the
 * caller runs the Python checker, which raises naming the problem.  That includes what
 * iterating a LazyFiles checks (each entry decoded as ztoc._read_entry decodes it, the
 * decoding budget, ztoc._check_entries on the order and bounds of the entries).
 * Beyond those, it leaves to Python: a TOC not in stream order (soci sorts it; Python
 * sorts before checking, here offsets must not decrease), more than 4 GiB of distinct
 * path bytes or 2^31 entries, and a zTOC header it cannot read (parse_ztoc has).
 *
 * Order matters in one place: _forget_below drops the paths of a subtree in the order
 * the Python dict `_kinds` holds them (the order they last became present), which
 * decides where a node whose every link goes ends up.  A record carries a sequence
 * number taken when it becomes present, and the subtree is dropped in that order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../index/_flatbuf.h"

#define MAX_NAME_BYTES (1 << 16)    /* ztoc._MAX_NAME_BYTES */
#define MAX_SHORT_STRING (1 << 12)  /* ztoc._MAX_SHORT_STRING */
#define ENTRY_COST 256              /* ztoc._ENTRY_COST */
#define XATTR_COST 128              /* ztoc._XATTR_COST */
#define DIGEST_COST 200             /* ztoc._DIGEST_COST */
#define BUDGET_PER_BYTE 8           /* ztoc.DECODE_BUDGET_PER_BYTE */
#define BUDGET_BASE (1 << 20)       /* ztoc.DECODE_BUDGET_BASE */
#define TAR_BLOCK 512               /* layerfs.TAR_BLOCK */
#define MAX_COMPONENT 255

/* Placement kinds, as table._KINDS numbers them. */
enum { K_REG, K_DIR, K_SYMLINK, K_HARDLINK, K_CHAR, K_BLOCK, K_FIFO, K_WHITEOUT, K_OPAQUE, K_SKIP };
static const char *const TYPE_NAMES[7] = {"reg", "dir", "symlink", "hardlink", "char", "block", "fifo"};

/* What a path holds in EntryChecker._kinds (ABSENT: not a key). */
enum { P_ABSENT, P_DIR, P_SYMLINK, P_REG, P_OTHER };
#define P_KIND_MASK 0x7
#define P_LINK_TARGET 0x80 /* the normalised target of some hard link entry */

/* finals[i] while checking: bit 0 final, bit 1 made_at set (cleared before returning). */
#define F_FINAL 1
#define F_MADE_AT 2

/* One interned path: where its bytes are in the arena and what the checker knows of it. */
typedef struct {
    uint32_t off;    /* in the arena */
    uint32_t lk;     /* length << 8 | P_* kind | P_LINK_TARGET */
    int32_t parent;  /* record of the parent path, set when the path becomes present */
    int32_t last;    /* EntryChecker._last: the entry last placed here, or -1 */
    int32_t node;    /* EntryChecker._node: the entry that created the node here, or -1 */
    uint32_t nchild; /* present records whose parent this is */
    uint32_t seq;    /* when it last became present: the order of _kinds */
} rec_t;

/* EntryChecker._links[node]: every path (record) holding a node that has hard links. */
typedef struct {
    int32_t node; /* -1: empty slot */
    uint32_t n, cap;
    uint32_t *recs;
} links_t;

typedef struct {
    uint32_t entry, rec;
} made_t;

/* A growable array in anonymous memory: mremap moves its pages, nothing is copied or
 * left behind, and munmap gives them back. */
typedef struct {
    void *p;
    size_t cap;
} region_t;

typedef struct {
    buf_t B;
    int64_t count, archive_size, usize, allowance, spent, next_header;
    /* the output columns (bytes objects of `count` bytes, path_index 8 * count) */
    uint8_t *kinds, *finals, *fresh, *linked;
    uint32_t *pidx; /* while checking: [2i] the record of entry i's path */
    region_t arena, recs_r, slots_r;
    size_t arena_len;
    rec_t *recs;
    uint32_t nrec, rec_cap;
    uint32_t *slots; /* record id + 1, 0 empty */
    uint32_t slot_mask;
    uint32_t seq;
    links_t *links;
    uint32_t nlinks, links_mask;
    made_t *made;
    size_t nmade, made_cap;
    int32_t checked_parent; /* EntryChecker._checked_parent's record, or -1 */
    uint8_t *name, *target; /* normalised name and link target, MAX_NAME_BYTES each */
} tree_t;

/* Return codes of the steps: OK, LEAVE (Python must take the archive: None), NOMEM. */
enum { OK = 1, LEAVE = 0, NOMEM = -1 };

static inline uint32_t rec_len(const rec_t *r) { return r->lk >> 8; }
static inline int rec_kind(const rec_t *r) { return r->lk & P_KIND_MASK; }
static inline const uint8_t *arena_at(const tree_t *T, uint32_t off) {
    return (const uint8_t *)T->arena.p + off;
}

static int region_grow(region_t *R, size_t need) {
    if (need <= R->cap) return OK;
    size_t cap = R->cap ? R->cap : 1 << 16;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) return NOMEM;
        cap *= 2;
    }
    void *p = R->p ? mremap(R->p, R->cap, cap, MREMAP_MAYMOVE)
                   : mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NOMEM;
    R->p = p;
    R->cap = cap;
    return OK;
}

static void region_free(region_t *R) {
    if (R->p) munmap(R->p, R->cap);
    R->p = NULL;
    R->cap = 0;
}

/* Paths are hashed component by component, h' = mix(h * K ^ H(component)), H the
 * interpreter's keyed hash of bytes (SipHash, its key random per process): an archive
 * cannot be made of paths that collide in the table, and a prefix's hash is a step on
 * the way to its path's, so walking the parents hashes each byte once. */
#if PY_VERSION_HEX >= 0x030E0000
#define KEYED_HASH(p, n) Py_HashBuffer((p), (Py_ssize_t)(n))
#else
#define KEYED_HASH(p, n) _Py_HashBytes((p), (Py_ssize_t)(n))
#endif

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

static inline uint64_t hash_component(uint64_t h, const uint8_t *c, size_t n) {
    return mix64(h * 0x9e3779b97f4a7c15ULL ^ (uint64_t)KEYED_HASH(c, n));
}

static inline uint32_t hash_slot(uint64_t h) { return (uint32_t)(h ^ (h >> 32)); }

/* The hash of a normalised path (components joined by single slashes; "" the root). */
static uint32_t hash_path(const uint8_t *p, size_t n) {
    uint64_t h = 0;
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '/') continue;
        h = hash_component(h, p + start, i - start);
        start = i + 1;
    }
    if (n) h = hash_component(h, p + start, n - start);
    return hash_slot(h);
}

/* === the path table: interning, growth */

static int grow_slots(tree_t *T) {
    uint32_t cap = T->slot_mask + 1;
    if (cap > (UINT32_MAX >> 2)) return LEAVE;
    uint32_t ncap = cap * 2;
    region_t R = {NULL, 0};
    int st = region_grow(&R, (size_t)ncap * sizeof(uint32_t)); /* zeroed: all empty */
    if (st != OK) return st;
    uint32_t *slots = R.p;
    for (uint32_t id = 0; id < T->nrec; id++) {
        const rec_t *r = &T->recs[id];
        uint32_t at = hash_path(arena_at(T, r->off), rec_len(r)) & (ncap - 1);
        while (slots[at]) at = (at + 1) & (ncap - 1);
        slots[at] = id + 1;
    }
    region_free(&T->slots_r);
    T->slots_r = R;
    T->slots = slots;
    T->slot_mask = ncap - 1;
    return OK;
}

/* The record of path p[0:n] (hash h): found, or (when `add`) made, absent; -1 when not
 * found and not added.  *st says LEAVE / NOMEM when it fails. */
static int64_t intern(tree_t *T, const uint8_t *p, uint32_t n, uint32_t h, int add, int *st) {
    uint32_t at = h & T->slot_mask;
    for (;;) {
        uint32_t s = T->slots[at];
        if (!s) break;
        const rec_t *r = &T->recs[s - 1];
        if (rec_len(r) == n && memcmp(arena_at(T, r->off), p, n) == 0) return s - 1;
        at = (at + 1) & T->slot_mask;
    }
    if (!add) return -1;
    if ((uint64_t)(T->nrec + 1) * 4 > (uint64_t)(T->slot_mask + 1) * 3) {
        *st = grow_slots(T);
        if (*st != OK) return -1;
        return intern(T, p, n, h, add, st);
    }
    if (T->nrec >= INT32_MAX - 1 || T->arena_len + n > UINT32_MAX) {
        *st = LEAVE; /* paths past what path_index's 32-bit offsets can name */
        return -1;
    }
    if (T->nrec == T->rec_cap) {
        if ((*st = region_grow(&T->recs_r, ((size_t)T->nrec + 1) * sizeof(rec_t))) != OK) return -1;
        T->recs = T->recs_r.p;
        T->rec_cap = (uint32_t)(T->recs_r.cap / sizeof(rec_t) < INT32_MAX ? T->recs_r.cap / sizeof(rec_t) : INT32_MAX);
    }
    if ((*st = region_grow(&T->arena, T->arena_len + n)) != OK) return -1;
    *st = OK;
    memcpy((uint8_t *)T->arena.p + T->arena_len, p, n);
    uint32_t id = T->nrec++;
    T->recs[id] = (rec_t){(uint32_t)T->arena_len, n << 8 | P_ABSENT, -1, -1, -1, 0, 0};
    T->arena_len += n;
    T->slots[at] = id + 1;
    return id;
}

/* _kinds[path] = kind, the path becoming present (under `parent`) if it was not. */
static int set_kind(tree_t *T, uint32_t id, int kind, int32_t parent) {
    rec_t *r = &T->recs[id];
    if (rec_kind(r) == P_ABSENT) {
        if (T->seq == UINT32_MAX) return LEAVE;
        r->parent = parent;
        if (parent >= 0) T->recs[parent].nchild++;
        r->seq = ++T->seq;
    }
    r->lk = (r->lk & ~(uint32_t)P_KIND_MASK) | (uint32_t)kind;
    return OK;
}

/* === hard-link lists (rare): EntryChecker._links */

static links_t *links_find(tree_t *T, int32_t node) {
    if (!T->links) return NULL;
    uint32_t at = hash_slot(mix64((uint32_t)node)) & T->links_mask;
    for (;;) {
        links_t *L = &T->links[at];
        if (L->node == node) return L;
        if (L->node < 0) return NULL;
        at = (at + 1) & T->links_mask;
    }
}

static int links_grow(tree_t *T) {
    uint32_t cap = T->links ? T->links_mask + 1 : 0, ncap = cap ? cap * 2 : 16;
    if (ncap > (UINT32_MAX >> 2)) return LEAVE;
    links_t *links = malloc((size_t)ncap * sizeof *links);
    if (!links) return NOMEM;
    for (uint32_t i = 0; i < ncap; i++) links[i] = (links_t){-1, 0, 0, NULL};
    for (uint32_t i = 0; i < cap; i++) {
        if (T->links[i].node < 0) continue;
        uint32_t at = hash_slot(mix64((uint32_t)T->links[i].node)) & (ncap - 1);
        while (links[at].node >= 0) at = (at + 1) & (ncap - 1);
        links[at] = T->links[i];
    }
    free(T->links);
    T->links = links;
    T->links_mask = ncap - 1;
    return OK;
}

static int links_push(links_t *L, uint32_t rec) {
    if (L->n == L->cap) {
        if (L->cap > (UINT32_MAX >> 2)) return LEAVE;
        uint32_t ncap = L->cap ? L->cap * 2 : 4;
        uint32_t *recs = realloc(L->recs, (size_t)ncap * sizeof *recs);
        if (!recs) return NOMEM;
        L->recs = recs;
        L->cap = ncap;
    }
    L->recs[L->n++] = rec;
    return OK;
}

/* _links.setdefault(node, [placements[node].path]).append(path) */
static int links_add(tree_t *T, int32_t node, uint32_t rec) {
    links_t *L = links_find(T, node);
    if (!L) {
        if (!T->links || (uint64_t)(T->nlinks + 1) * 2 > (uint64_t)T->links_mask + 1) {
            int st = links_grow(T);
            if (st != OK) return st;
        }
        uint32_t at = hash_slot(mix64((uint32_t)node)) & T->links_mask;
        while (T->links[at].node >= 0) at = (at + 1) & T->links_mask;
        L = &T->links[at];
        L->node = node;
        T->nlinks++;
        int st = links_push(L, T->pidx[2 * (int64_t)node]);
        if (st != OK) return st;
    }
    return links_push(L, rec);
}

/* === EntryChecker._drop and _forget_below */

static int set_made_at(tree_t *T, int32_t entry, uint32_t rec) {
    if (T->nmade == T->made_cap) {
        size_t ncap = T->made_cap ? T->made_cap * 2 : 16;
        made_t *made = realloc(T->made, ncap * sizeof *made);
        if (!made) return NOMEM;
        T->made = made;
        T->made_cap = ncap;
    }
    T->made[T->nmade++] = (made_t){(uint32_t)entry, rec};
    T->finals[entry] |= F_MADE_AT;
    return OK;
}

/* The node at path `id` is replaced: its entry is no longer final, unless a hard link keeps it. */
static int drop(tree_t *T, uint32_t id) {
    rec_t *r = &T->recs[id];
    int32_t prev = r->last, node = r->node;
    r->last = r->node = -1;
    if (prev >= 0) T->finals[prev] &= ~F_FINAL;
    if (node < 0) return OK;
    links_t *L = links_find(T, node);
    if (!L) return OK;
    uint32_t j = 0;
    while (j < L->n && L->recs[j] != id) j++;
    if (j == L->n) return LEAVE; /* list.remove would raise ValueError */
    memmove(L->recs + j, L->recs + j + 1, (L->n - j - 1) * sizeof *L->recs);
    L->n--;
    uint32_t *path = &T->pidx[2 * (int64_t)node];
    if (*path == id) {
        if (L->n) {
            uint32_t was = *path;
            *path = L->recs[0];
            T->finals[node] |= F_FINAL;
            if (!(T->finals[node] & F_MADE_AT)) return set_made_at(T, node, was);
        } else {
            T->finals[node] &= ~F_FINAL;
        }
    }
    return OK;
}

static int by_seq(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* A path replaced by a non-directory takes its old subtree with it (in _kinds' order). */
static int forget_below(tree_t *T, uint32_t id) {
    const rec_t *d = &T->recs[id];
    if (rec_kind(d) != P_DIR || d->nchild == 0) return OK; /* nothing present below it */
    uint32_t n = rec_len(d), off = d->off;
    size_t cap = 64, k = 0;
    uint32_t *below = malloc(cap * 2 * sizeof *below); /* (seq, id) pairs */
    if (!below) return NOMEM;
    for (uint32_t i = 1; i < T->nrec; i++) {
        const rec_t *r = &T->recs[i];
        if (rec_kind(r) == P_ABSENT || rec_len(r) <= n + 1) continue;
        const uint8_t *p = arena_at(T, r->off);
        if (p[n] != '/' || memcmp(p, arena_at(T, off), n) != 0) continue;
        if (k == cap) {
            uint32_t *more = realloc(below, cap * 4 * sizeof *below);
            if (!more) {
                free(below);
                return NOMEM;
            }
            below = more;
            cap *= 2;
        }
        below[2 * k] = r->seq;
        below[2 * k + 1] = i;
        k++;
    }
    qsort(below, k, 2 * sizeof *below, by_seq);
    int st = OK;
    for (size_t j = 0; j < k && st == OK; j++) {
        rec_t *r = &T->recs[below[2 * j + 1]];
        r->lk &= ~(uint32_t)P_KIND_MASK; /* del _kinds[p] */
        if (r->parent >= 0) T->recs[r->parent].nchild--;
        st = drop(T, below[2 * j + 1]);
    }
    free(below);
    return st;
}

/* === one entry */

/* split_name: the normalised components of name[0:n] joined by "/" into out; LEAVE when
 * Python refuses it (absolute, "..", a component over 255 bytes; NULs are refused by the
 * decoder's checks).  *base: where the last component starts (== *len when none). */
static int normalise(const uint8_t *name, int64_t n, uint8_t *out, int64_t *len, int64_t *base) {
    if (n && name[0] == '/') return LEAVE;
    int64_t o = 0, b = 0, start = 0;
    for (int64_t i = 0; i <= n; i++) {
        if (i < n && name[i] != '/') continue;
        int64_t cl = i - start;
        const uint8_t *c = name + start;
        start = i + 1;
        if (cl == 0 || (cl == 1 && c[0] == '.')) continue;
        if (cl == 2 && c[0] == '.' && c[1] == '.') return LEAVE;
        if (cl > MAX_COMPONENT) return LEAVE;
        if (o) out[o++] = '/';
        b = o;
        memcpy(out + o, c, (size_t)cl);
        o += cl;
    }
    *len = o;
    *base = o ? b : 0;
    return OK;
}

static int starts(const uint8_t *p, int64_t n, const char *s) {
    size_t k = strlen(s);
    return (size_t)n >= k && memcmp(p, s, k) == 0;
}

/* Every proper prefix of path[0:n] (the parents) must be a directory or absent; absent
 * ones become directories.  *parent: the record of path[0:n] itself. */
static int walk_parents(tree_t *T, const uint8_t *p, int64_t n, int32_t *parent) {
    int32_t prev = 0; /* the root */
    uint64_t h = 0;
    int64_t start = 0;
    for (int64_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '/') continue;
        if (i == 0) break; /* the root itself */
        h = hash_component(h, p + start, (size_t)(i - start));
        start = i + 1;
        int st = OK;
        int64_t id = intern(T, p, (uint32_t)i, hash_slot(h), 1, &st);
        if (id < 0) return st;
        int kind = rec_kind(&T->recs[id]);
        if (kind == P_ABSENT) {
            if ((st = set_kind(T, (uint32_t)id, P_DIR, prev)) != OK) return st;
        } else if (kind != P_DIR) {
            return LEAVE; /* through a symlink or a non-directory */
        }
        prev = (int32_t)id;
    }
    *parent = prev;
    return OK;
}

/* Check the decoding of entry table t as ztoc._read_entry does; its fields into the out
 * parameters.  LEAVE when the decoder would refuse it (or it passes the budget). */
static int decode(tree_t *T, int64_t t, const uint8_t **name, int64_t *name_len, int *type,
                  const uint8_t **link, int64_t *link_len, int64_t *offset, int64_t *size) {
    static const int widths[14] = {4, 4, 8, 8, 4, 8, 4, 4, 4, 4, 4, 8, 8, 4};
    static const int idx[6] = {0, 1, 4, 8, 9, 10};
    static const int64_t limit[6] = {MAX_NAME_BYTES, 16, MAX_NAME_BYTES, MAX_SHORT_STRING, MAX_SHORT_STRING, 64};
    const buf_t *B = &T->B;
    int64_t o[14];
    if (!table_fields(B, t, 14, widths, o)) return LEAVE;
    const uint8_t *sp[6];
    int64_t sl[6];
    for (int i = 0; i < 6; i++)
        if (!string_at(B, o[idx[i]], limit[i], &sp[i], &sl[i])) return LEAVE;
    if (sl[0] == 0 || memchr(sp[0], 0, (size_t)sl[0]) || memchr(sp[2], 0, (size_t)sl[2])) return LEAVE;
    *type = -1;
    for (int i = 0; i < 7; i++)
        if ((size_t)sl[1] == strlen(TYPE_NAMES[i]) && memcmp(sp[1], TYPE_NAMES[i], (size_t)sl[1]) == 0) *type = i;
    if (*type < 0) return LEAVE;
    int64_t cost = ENTRY_COST + sl[0] + sl[2] + sl[3] + sl[4] + sl[5];
    if (o[13]) { /* the xattr vector: ztoc._read_xattrs */
        static const int xwidths[2] = {4, 4};
        int64_t v = o[13] + u32(B, o[13]);
        if (v > B->n - 4) return LEAVE;
        int64_t count = u32(B, v);
        if (count * 4 > B->n - v - 4) return LEAVE;
        cost += count * XATTR_COST;
        if (cost > T->allowance - T->spent) return LEAVE;
        for (int64_t j = 0; j < count; j++) {
            int64_t ref = v + 4 + 4 * j, f[2], kl, vl;
            const uint8_t *kp, *vp;
            if (!table_fields(B, ref + u32(B, ref), 2, xwidths, f)) return LEAVE;
            if (!string_at(B, f[0], MAX_SHORT_STRING, &kp, &kl)) return LEAVE;
            if (!string_at(B, f[1], MAX_NAME_BYTES, &vp, &vl)) return LEAVE;
            cost += kl + vl;
            if (cost > T->allowance - T->spent) return LEAVE;
        }
    }
    if (cost > T->allowance - T->spent) return LEAVE;
    T->spent += cost;
    *offset = *size = 0;
    if (o[2]) memcpy(offset, B->b + o[2], 8);
    if (o[3]) memcpy(size, B->b + o[3], 8);
    *name = sp[0];
    *name_len = sl[0];
    *link = sp[2];
    *link_len = sl[2];
    return OK;
}

/* EntryChecker.check of entry i (at `start` + 4i): LEAVE when it would raise. */
static int check_entry(tree_t *T, int64_t start, int64_t i) {
    const uint8_t *name, *link;
    int64_t name_len, link_len, off, size;
    int type, st;
    int64_t t = toc_entry_at(&T->B, start, i);
    if (t < 0) return LEAVE;
    st = decode(T, t, &name, &name_len, &type, &link, &link_len, &off, &size);
    if (st != OK) return st;
    /* ztoc._check_entries, in TOC order: exact when the offsets do not decrease, and a
     * decreasing offset fails here (Python sorts first: it may accept; None is safe) */
    if (size < 0 || off < 0) return LEAVE;
    int64_t data = type == K_REG ? size : 0;
    if (off > T->usize || data > T->usize - off || off - TAR_BLOCK < T->next_header) return LEAVE;
    T->next_header = off + data + (-data & (TAR_BLOCK - 1));
    /* EntryChecker.check's bounds */
    if (type == K_REG && (off > T->archive_size || size > T->archive_size - off)) return LEAVE;

    int64_t n, base;
    uint8_t *p = T->name;
    if (normalise(name, name_len, p, &n, &base) != OK) return LEAVE;
    const uint8_t *b = p + base;
    int64_t bl = n - base;
    int kind;
    int64_t parent_len; /* the parents to walk: the proper prefixes of p[0:parent_len] and itself */
    if (n == 0) {
        kind = K_SKIP; /* the layer root itself */
        parent_len = 0;
    } else if (bl == 12 && memcmp(b, ".wh..wh..opq", 12) == 0) {
        kind = K_OPAQUE;
        n = base ? base - 1 : 0;
        parent_len = n;
    } else if (starts(b, bl, ".wh..wh.")) {
        kind = K_SKIP;
        parent_len = 0;
    } else if (starts(b, bl, ".wh.")) {
        kind = K_WHITEOUT;
        if (bl == 4 || (bl == 5 && b[4] == '.') || (bl == 6 && b[4] == '.' && b[5] == '.')) return LEAVE;
        memmove(p + base, p + base + 4, (size_t)(bl - 4));
        n -= 4;
        parent_len = base ? base - 1 : 0;
    } else {
        kind = type;
        parent_len = base ? base - 1 : 0;
    }
    st = OK;
    int64_t id = intern(T, p, (uint32_t)n, hash_path(p, (size_t)n), 1, &st);
    if (id < 0) return st;
    int fresh = rec_kind(&T->recs[id]) == P_ABSENT;
    T->fresh[i] = (uint8_t)fresh;
    T->kinds[i] = (uint8_t)kind;
    T->finals[i] = F_FINAL;
    T->pidx[2 * i] = (uint32_t)id;
    if (kind == K_SKIP) {
        if (!fresh) T->checked_parent = -1;
        return OK;
    }
    int32_t parent = -1;
    const rec_t *cp = T->checked_parent >= 0 ? &T->recs[T->checked_parent] : NULL;
    if (cp && rec_len(cp) == parent_len && rec_kind(cp) == P_DIR &&
        memcmp(arena_at(T, cp->off), p, (size_t)parent_len) == 0) {
        parent = T->checked_parent; /* _checked_parent: every prefix was found a directory */
    } else {
        st = walk_parents(T, p, parent_len, &parent);
        if (st != OK) return st;
        T->checked_parent = parent;
    }
    if (!fresh || kind == K_WHITEOUT) T->checked_parent = -1;
    if (kind == K_SYMLINK && link_len == 0) return LEAVE;
    int64_t target = -1;
    if (kind == K_HARDLINK) {
        int64_t tn, tbase;
        if (normalise(link, link_len, T->target, &tn, &tbase) != OK || tn == 0) return LEAVE;
        target = intern(T, T->target, (uint32_t)tn, hash_path(T->target, (size_t)tn), 0, &st);
        if (target < 0) return LEAVE; /* missing from the layer */
        int tkind = rec_kind(&T->recs[target]);
        if (tkind == P_ABSENT || tkind == P_DIR) return LEAVE;
        T->recs[target].lk |= P_LINK_TARGET;
    }
    if (kind == K_OPAQUE) return OK;
    if (kind == K_WHITEOUT) {
        if ((st = forget_below(T, (uint32_t)id)) != OK) return st;
        if ((st = drop(T, (uint32_t)id)) != OK) return st;
        T->recs[id].last = (int32_t)i;
        return set_kind(T, (uint32_t)id, P_OTHER, parent);
    }
    if (kind == K_DIR) {
        st = set_kind(T, (uint32_t)id, P_DIR, parent); /* a dir replacing a dir keeps the subtree */
    } else {
        if ((st = forget_below(T, (uint32_t)id)) != OK) return st;
        st = set_kind(T, (uint32_t)id, kind == K_SYMLINK ? P_SYMLINK : kind == K_REG ? P_REG : P_OTHER, parent);
    }
    if (st != OK) return st;
    if ((st = drop(T, (uint32_t)id)) != OK) return st;
    T->recs[id].last = (int32_t)i;
    if (kind == K_HARDLINK) {
        int32_t node = T->recs[target].node;
        if (node >= 0) {
            T->recs[id].node = node;
            if ((st = links_add(T, node, (uint32_t)id)) != OK) return st;
        }
    } else if (kind != K_DIR) {
        T->recs[id].node = (int32_t)i;
    }
    return OK;
}

/* === the zTOC header: what LazyFiles checks the entries against */

/* The archive size (usize) and the decoding allowance a LazyFiles of this zTOC has
 * (parse_ztoc's budget less the span digests'); LEAVE when they cannot be read. */
static int header(tree_t *T) {
    static const int widths[6] = {4, 4, 8, 8, 4, 4}, ci_widths[3] = {1, 4, 4};
    const buf_t *B = &T->B;
    int64_t f[6], c[3];
    if (B->n < 8) return LEAVE;
    if (!table_fields(B, u32(B, 0), 6, widths, f) || !f[5]) return LEAVE;
    T->usize = 0;
    if (f[3]) memcpy(&T->usize, B->b + f[3], 8);
    if (T->usize < 0 || f[5] > B->n - 4) return LEAVE;
    if (!table_fields(B, f[5] + u32(B, f[5]), 3, ci_widths, c)) return LEAVE;
    int64_t digests = 0;
    if (c[2]) {
        int64_t v = c[2] + u32(B, c[2]);
        if (v > B->n - 4) return LEAVE;
        digests = u32(B, v);
    }
    T->allowance = BUDGET_PER_BYTE * B->n + BUDGET_BASE - digests * DIGEST_COST;
    return T->allowance < 0 ? LEAVE : OK;
}

/* === the module function */

static void tree_free(tree_t *T) {
    region_free(&T->arena);
    region_free(&T->recs_r);
    region_free(&T->slots_r);
    if (T->links)
        for (uint32_t i = 0; i <= T->links_mask; i++) free(T->links[i].recs);
    free(T->links);
    free(T->made);
    free(T->name);
    free(T->target);
}

PyDoc_STRVAR(check_toc_doc,
"check_toc(buf, start, count, archive_size, file_backed=False)\n"
"    -> (kinds, finals, fresh, paths, path_index, made_at, linked) | None\n\n"
"layerfs.check_archive(parse_ztoc(buf, lazy_files=True).files, archive_size) in C, for\n"
"the TOC vector of `count` entries at `start` of the zTOC in `buf`, as columns:\n"
"kinds[i] (table._KINDS code), finals[i], fresh[i] (one byte each), entry i's path as\n"
"paths[off:off + len] where (off, len) = struct.unpack_from('<II', path_index, 8 * i),\n"
"made_at {i: bytes} where it is not empty, linked[i]: entry i's created_at is the target\n"
"of a hard link.  None whenever the Python checker must take it: whatever it (or the\n"
"decoding of the entries) would refuse, and anything this checker leaves to it.\n"
"`buf` must be the buffer parse_ztoc read (its length sets the decoding budget) and\n"
"`archive_size` what check_archive is given (the zTOC's uncompressed archive size).\n"
"With `file_backed` (`buf` maps a file, never memory of its own) the pass gives the\n"
"buffer's pages back as it goes, so it does not hold the whole zTOC in its RSS.\n\n"
"Raises:\n"
"    ValueError: the TOC vector lies outside the buffer.\n"
"    MemoryError: no memory for the columns or the path table.");

static PyObject *check_toc(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, count;
    long long archive_size;
    int file_backed = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnL|p", &view, &start, &count, &archive_size, &file_backed)) return NULL;
    tree_t T;
    memset(&T, 0, sizeof T);
    T.B = (buf_t){view.buf, view.len};
    T.count = count;
    T.archive_size = archive_size;
    T.checked_parent = -1;
    PyObject *cols[5] = {NULL, NULL, NULL, NULL, NULL}, *made = NULL, *paths = NULL, *result = NULL;
    int st = OK;
    if (start < 0 || count < 0 || count > (T.B.n - start) / 4) {
        PyErr_SetString(PyExc_ValueError, "TOC vector lies outside the buffer");
        goto done;
    }
    if (archive_size < 0 || count > archive_size / TAR_BLOCK || count >= INT32_MAX || header(&T) != OK) {
        st = LEAVE;
        goto done;
    }
    for (int c = 0; c < 5; c++) {
        cols[c] = PyBytes_FromStringAndSize(NULL, c == 4 ? 8 * count : count);
        if (!cols[c]) goto done;
    }
    T.kinds = (uint8_t *)PyBytes_AS_STRING(cols[0]);
    T.finals = (uint8_t *)PyBytes_AS_STRING(cols[1]);
    T.fresh = (uint8_t *)PyBytes_AS_STRING(cols[2]);
    T.linked = (uint8_t *)PyBytes_AS_STRING(cols[3]);
    T.pidx = (uint32_t *)PyBytes_AS_STRING(cols[4]);
    T.slot_mask = 1023; /* grow_slots makes the first table, of 2048 */
    if ((st = grow_slots(&T)) != OK || (st = region_grow(&T.arena, 1)) != OK) goto done;
    T.name = malloc(MAX_NAME_BYTES);
    T.target = malloc(MAX_NAME_BYTES);
    if (!T.name || !T.target) {
        st = NOMEM;
        goto done;
    }
    int64_t root = intern(&T, (const uint8_t *)"", 0, hash_path(NULL, 0), 1, &st);
    if (root != 0) goto done;
    set_kind(&T, 0, P_DIR, -1);
    for (int64_t i = 0; i < count && st == OK; i++) {
        if (file_backed && i && (i & (GIVE_BACK_EVERY - 1)) == 0) give_back_all(&T.B);
        st = check_entry(&T, start, i);
    }
    if (st != OK) goto done;

    /* the columns as Python wants them */
    for (int64_t i = 0; i < count; i++) {
        uint32_t rec = T.pidx[2 * i];
        T.pidx[2 * i] = T.recs[rec].off;
        T.pidx[2 * i + 1] = rec_len(&T.recs[rec]);
        if (!(T.finals[i] & F_MADE_AT)) T.linked[i] = (T.recs[rec].lk & P_LINK_TARGET) != 0;
        T.finals[i] &= F_FINAL;
    }
    made = PyDict_New();
    if (!made) goto done;
    for (size_t j = 0; j < T.nmade; j++) {
        const rec_t *r = &T.recs[T.made[j].rec];
        T.linked[T.made[j].entry] = (r->lk & P_LINK_TARGET) != 0;
        PyObject *k = PyLong_FromUnsignedLong(T.made[j].entry);
        PyObject *v = k ? PyBytes_FromStringAndSize((const char *)arena_at(&T, r->off), rec_len(r)) : NULL;
        int bad = !v || PyDict_SetItem(made, k, v) < 0;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad) goto done;
    }
    /* the path table is done with: give it back before the paths are copied out */
    region_free(&T.recs_r);
    region_free(&T.slots_r);
    paths = PyBytes_FromStringAndSize(T.arena.p ? (const char *)T.arena.p : "", (Py_ssize_t)T.arena_len);
    if (!paths) goto done;
    result = PyTuple_Pack(7, cols[0], cols[1], cols[2], paths, cols[4], made, cols[3]);
done:
    if (st == NOMEM && !PyErr_Occurred()) PyErr_NoMemory();
    if (st == LEAVE && !PyErr_Occurred()) result = Py_NewRef(Py_None);
    for (int c = 0; c < 5; c++) Py_XDECREF(cols[c]);
    Py_XDECREF(made);
    Py_XDECREF(paths);
    tree_free(&T);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"check_toc", check_toc, METH_VARARGS, check_toc_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "prewarm.store._tree",
    "The layer-tree check of a whole TOC in C (see prewarm.store.layerfs.check_archive).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tree(void) { return PyModule_Create(&module); }
