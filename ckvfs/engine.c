/*
 * engine.c — the chunk engine (DESIGN §5); the contract is ckv_engine.h.
 *
 * Arena. One memfd, mapped RW here, cut into 2 MiB pages (the last one may be
 * shorter). A page is handed to a size class on demand and becomes a slab of
 * equal slots (stride = chunk_bytes rounded up to 4096), so the common chunk
 * sizes 8/16/32/64 KiB fill a page without waste and every slot is 4 KiB
 * aligned for O_DIRECT. A chunk larger than a page gets a slab of several
 * contiguous pages. A slab whose slots are all free gives its pages back.
 *
 * I/O. One I/O thread owns an io_uring (queue_depth entries plus one for the
 * eventfd that wakes it). Chunks to read wait in three queues, demand (a
 * reader waits), background (prefetch) and idle (speculative gets,
 * CKV_GET_IDLE); demand is drained first, then background; idle reads start
 * only while nothing of the other two is queued or in flight, at most
 * opts.idle_depth of them at once, so a speculation never delays a read
 * somebody needs by more than those few; ckv_engine_cancel withdraws idle
 * reads that have not started. A get that needs a chunk queued as idle
 * moves it to the demand queue. Whatever is queued when the thread looks
 * is sorted by (file, chunk), files in the order their first chunk was
 * queued (a reader that asked first is served first), and adjacent chunks
 * of one file become one readv straight into their slots (up to
 * CKV_MAX_IOV chunks). Short reads are resubmitted for the rest, -EAGAIN
 * resubmitted, -EINVAL on an O_DIRECT file reopens it buffered. Each chunk
 * is hashed with XXH3-64 before anybody can see it; a mismatch frees the
 * slot and fails that chunk alone with -EIO. A second request for a chunk
 * in flight waits on the same read. Callbacks of async gets run on the I/O
 * thread, or with CKV_GET_INLINE those of chunks already there on the
 * caller's, before ckv_engine_get_async returns.
 *
 * Retention. Per (file key, chunk) the engine keeps I (sum of score
 * feedback) and F (demand accesses), both decayed with opts.halflife_s, and
 * the last update time. Decay is lazy: values are stored normalised to an
 * epoch, v_hat = v(t) * 2^((t - epoch) / h), so uniform decay never changes
 * their order; the epoch is moved forward (every value rescaled, heaps
 * rebuilt) when the factor would grow past 2^256.
 *
 *   S = (I + CKV_SCORE_EPS * F) * F
 *
 * is I x F plus a small frequency-only term, so a chunk without importance
 * feedback is still ranked (by decayed frequency, LRFU-like) and always
 * below a scored chunk of equal F. The expression is homogeneous of degree
 * two in (I, F), which keeps the order decay-invariant and lets the eviction
 * heaps keep static keys. Ties (e.g. S = 0) go to the least recently used.
 *
 * Evictable slots (resident, unpinned) sit in one of two min-heaps: "plain"
 * (I <= 0) and "important" (I > 0). Policy ATTN evicts the lower of the two
 * tops; policy LRU keeps everything in the plain heap keyed by recency.
 * A heap orders slots by the (S, recency) they had when they went in. A get
 * of a slot in a heap leaves it there, pinned and marked for re-keying: an
 * access only raises its S and recency, so such a slot's true place is at or below
 * the stored one, and a clean top is still the true minimum. Only the top is
 * put right, when a victim is chosen: a pinned top leaves the heap (its
 * release puts it back), a marked one is re-keyed and sifted down. A hit thus
 * costs no heap work; feedback, which may lower S, re-keys at once.
 *
 * Streaming reads (CKV_GET_STREAM: cp, rsync, cat) neither add to F nor
 * create retention records, so a stream-loaded chunk has S = 0 and is the
 * first to go. Under ATTN they may only evict from the plain heap. When the
 * arena has no slot they may take (everything else important or pinned), a
 * streaming read still succeeds: the chunk goes to a detached buffer outside
 * the arena (ckv_slot_offset() == CKV_SLOT_DETACHED), freed at release, at
 * most CKV_DETACHED_MAX bytes at a time (-ENOMEM beyond). A whole-file copy
 * therefore works with any arena size. Demand reads get -ENOMEM when nothing
 * can be evicted.
 *
 * Locking: one mutex, e->lock, protects all shared state; the I/O thread
 * drops it while hashing chunks, submitting and waiting. Fields marked
 * "I/O thread" are touched by that thread only. Callbacks (get_async, the
 * retention iterator) run without the lock; the log sink may be called with
 * it held and must not call into the engine.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memfd_create, O_DIRECT; the Makefile passes it too */
#endif
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ckv_engine.h"

#define CKV_PAGE_BYTES (2ull << 20)
#define CKV_SLOT_ALIGN 4096ull
#define CKV_MAX_IOV 64u
#define CKV_SCORE_EPS 1e-3
#define CKV_REBASE_HALFLIVES 256.0
#define CKV_DETACHED_MAX (64ull << 20)
#define CKV_MAX_LOAD_CHUNK (1u << 24)
#define CKV_DEFAULT_ARENA (1ull << 30)
#define CKV_DEFAULT_QD 128u
#define CKV_DEFAULT_IDLE_QD 16u
#define CKV_MAX_QD 4096u
#define CKV_DEFAULT_HALFLIFE 600.0

enum slot_state { SLOT_FREE = 0, SLOT_READING, SLOT_READY };
enum slot_queue { Q_NONE = 0, Q_DEMAND, Q_BG, Q_IDLE };
enum { HEAP_NONE = 0, HEAP_PLAIN = 1, HEAP_IMPORTANT = 2 };

/* Retention record of one chunk; normalised to e->epoch (see top). */
struct rstat {
	double i_hat;
	double f_hat;
	int64_t last; /* unix seconds of the last access or score; 0 = no record */
};

/* Retention table entry: one per file key ever seen; freed at close. */
struct rkey {
	struct rkey *next;  /* hash chain; e->lock */
	uint64_t hash;      /* immutable */
	char *key;          /* immutable */
	struct rstat *st;   /* [cap]; e->lock */
	uint32_t cap;       /* e->lock */
	ckv_efile *live;    /* the registered file of this key, or NULL; e->lock */
};

struct ckv_efile {
	struct ckv_efile *prev, *next; /* e->files; e->lock */
	struct rkey *rk;               /* immutable */
	uint64_t chunk_bytes;          /* bytes read per chunk; immutable */
	uint64_t pitch, base;          /* chunk i is at base + i * pitch in the file; immutable */
	uint64_t stride;               /* slot size: chunk_bytes rounded to 4096; immutable */
	uint32_t nchunks;              /* immutable */
	uint64_t *sums;                /* [nchunks] or NULL (unverified); immutable */
	int dirfd;                     /* ours (dup) or AT_FDCWD; e->lock */
	char *relpath;                 /* e->lock */
	int fd;                        /* -1 until the first read; e->lock */
	bool direct;                   /* fd is O_DIRECT; e->lock */
	bool stale;                    /* replaced by a new file of the same key; e->lock */
	unsigned users;                /* ckv_engine_file_get references; e->lock */
	unsigned nslots;               /* slots (any state, detached too) naming this file; e->lock */
	unsigned nreading;             /* of those, reads queued or in flight; e->lock */
	ckv_slot **ent;                /* [nchunks] arena slot of each chunk or NULL; e->lock */
	uint64_t rank_gen;             /* io_build's batch that ranked it; I/O thread, e->lock */
	uint32_t rank;                 /* its order in that batch; I/O thread, e->lock */
};

struct getreq;

/* One ref of one get: linked on its slot while the read is in flight. */
struct waiter {
	struct getreq *req;
	size_t i;
	struct waiter *next; /* slot->waiters, then e->deliver; e->lock */
};

struct getreq {
	size_t n;
	size_t remaining;  /* sync: refs not yet complete; e->lock */
	ckv_slot **slots;  /* results; written under e->lock */
	int *rcs;
	pthread_cond_t cv; /* sync only: signalled when remaining reaches 0 */
	ckv_get_cb cb;     /* NULL for a synchronous get */
	void *arg;
	atomic_size_t delivered; /* async: callbacks run (the I/O thread's and inline ones) */
	bool inline_open;  /* CKV_GET_INLINE, while get_submit runs: completions go to inl; e->lock */
	struct waiter *inl, *inl_tail; /* completions the caller delivers itself; e->lock */
	struct waiter w[];
};

struct slab;

struct ckv_slot {
	/* immutable for the life of the slot */
	void *data;
	uint64_t off;         /* from the arena base, CKV_SLOT_DETACHED for detached */
	struct slab *slab;    /* NULL for detached */
	/* e->lock */
	uint64_t len;
	ckv_efile *f;
	uint32_t chunk;
	uint32_t pins;
	uint8_t state;        /* enum slot_state */
	uint8_t queue;        /* enum slot_queue */
	uint8_t heap;         /* HEAP_* */
	bool prefetched;      /* loaded by prefetch, no get has used it yet */
	bool detached;
	bool rekey;           /* in a heap, accessed since its key was taken */
	size_t heap_idx;
	double key;           /* S when it went into its heap, ATTN only */
	uint64_t hseq;        /* seq when it went into its heap */
	uint64_t seq;         /* recency stamp */
	struct waiter *waiters;
	ckv_slot *qprev, *qnext; /* queue links; qnext is also the slab free list */
};

struct sclass {
	uint64_t stride;
	struct slab *partial; /* slabs with a free slot; e->lock */
};

struct slab {
	struct sclass *cls;
	uint32_t first_page, npages;
	uint32_t nslots, nfree;            /* e->lock */
	ckv_slot *free;                    /* e->lock */
	struct slab *pprev, *pnext;        /* cls->partial; e->lock */
	bool on_partial;                   /* e->lock */
	ckv_slot slots[];
};

struct squeue {
	ckv_slot *head, *tail;
	size_t len;
};

/* A read of n adjacent chunks of one file. Owned by the I/O thread. */
struct rdop {
	struct rdop *next;
	ckv_efile *f;
	uint64_t off;       /* file offset of the first chunk */
	uint64_t total;     /* bytes wanted */
	uint64_t done;      /* bytes read so far */
	uint32_t n;
	uint32_t iov_first; /* first iovec still to fill */
	int rc;             /* 0, or the error that ended the read */
	bool reopen;        /* O_DIRECT refused: reopen buffered, then retry */
	bool idle;          /* taken from the idle queue */
	ckv_slot **slots;   /* [n] */
	int *rcs;           /* [n] per-chunk verdict */
	struct iovec *iov;  /* [n] */
};

struct ckv_engine {
	/* Lock order: e->lock is the only lock; callers' locks come before it. */
	pthread_mutex_t lock;

	/* immutable after open */
	ckv_engine_opts o;
	int memfd;
	unsigned char *base;
	uint64_t arena_size;
	uint32_t npages;
	int evfd;
	pthread_t io_thread;

	/* e->lock */
	struct slab **page_slab;   /* [npages] owner or NULL */
	uint32_t free_pages;
	uint32_t page_hint;
	struct sclass **classes;
	size_t nclasses;
	ckv_slot **heap[2];        /* [0] plain, [1] important */
	size_t heap_len[2], heap_cap[2];
	uint64_t total_slots;      /* slots in all slabs */
	struct rkey **rk_tab;
	size_t rk_nb, rk_count;
	ckv_efile *files;          /* every efile struct alive */
	struct squeue qdemand, qbg, qidle;
	struct waiter *deliver, *deliver_tail;
	uint64_t seq;
	double epoch;              /* monotonic seconds that normalised values refer to */
	uint64_t detached_bytes;
	ckv_engine_stats st;
	bool stopping;

	/* I/O thread */
	struct io_uring ring;
	struct rdop *retry;
	unsigned inflight;         /* ops submitted and not finished */
	unsigned inflight_idle;    /* of those, reads of the idle queue */
	ckv_slot **batch;          /* [queue_depth * CKV_MAX_IOV] */
	uint64_t rank_gen;         /* batches ranked so far (io_build) */
	uint64_t evbuf;
};

/* ---- small helpers ------------------------------------------------------ */

static double mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void default_log(void *arg, const char *msg)
{
	(void)arg;
	fprintf(stderr, "%s\n", msg);
}

static void elog(const ckv_engine *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void elog(const ckv_engine *e, const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	e->o.log(e->o.log_arg, buf);
}

static void kick(ckv_engine *e)
{
	eventfd_write(e->evfd, 1);
}

static void q_push(struct squeue *q, ckv_slot *s, bool front)
{
	s->qprev = s->qnext = NULL;
	if (!q->head) {
		q->head = q->tail = s;
	} else if (front) {
		s->qnext = q->head;
		q->head->qprev = s;
		q->head = s;
	} else {
		s->qprev = q->tail;
		q->tail->qnext = s;
		q->tail = s;
	}
	q->len++;
}

static void q_remove(struct squeue *q, ckv_slot *s)
{
	if (s->qprev)
		s->qprev->qnext = s->qnext;
	else
		q->head = s->qnext;
	if (s->qnext)
		s->qnext->qprev = s->qprev;
	else
		q->tail = s->qprev;
	s->qprev = s->qnext = NULL;
	q->len--;
}

static ckv_slot *q_pop(struct squeue *q)
{
	ckv_slot *s = q->head;

	if (s)
		q_remove(q, s);
	return s;
}

/* ---- retention table ---------------------------------------------------- */

static struct rkey *rkey_find(ckv_engine *e, const char *key, bool create)
{
	uint64_t h = XXH3_64bits(key, strlen(key));
	struct rkey *rk;

	for (rk = e->rk_tab[h & (e->rk_nb - 1)]; rk; rk = rk->next)
		if (rk->hash == h && strcmp(rk->key, key) == 0)
			return rk;
	if (!create)
		return NULL;

	if (e->rk_count + 1 > e->rk_nb) {
		size_t nb = e->rk_nb * 2;
		struct rkey **tab = calloc(nb, sizeof(*tab));

		if (tab) {
			for (size_t b = 0; b < e->rk_nb; b++) {
				struct rkey *next;

				for (rk = e->rk_tab[b]; rk; rk = next) {
					next = rk->next;
					rk->next = tab[rk->hash & (nb - 1)];
					tab[rk->hash & (nb - 1)] = rk;
				}
			}
			free(e->rk_tab);
			e->rk_tab = tab;
			e->rk_nb = nb;
		} /* else keep the longer chains */
	}
	rk = calloc(1, sizeof(*rk));
	if (!rk)
		return NULL;
	rk->key = strdup(key);
	if (!rk->key) {
		free(rk);
		return NULL;
	}
	rk->hash = h;
	rk->next = e->rk_tab[h & (e->rk_nb - 1)];
	e->rk_tab[h & (e->rk_nb - 1)] = rk;
	e->rk_count++;
	return rk;
}

/* The record of chunk c, NULL if it has none (and !create) or on ENOMEM. */
static struct rstat *rstat_get(struct rkey *rk, uint32_t c, bool create)
{
	if (c < rk->cap)
		return &rk->st[c];
	if (!create)
		return NULL;

	uint64_t cap = rk->cap ? rk->cap : 16;

	while (cap <= c)
		cap *= 2;
	struct rstat *st = realloc(rk->st, cap * sizeof(*st));

	if (!st)
		return NULL;
	memset(st + rk->cap, 0, (cap - rk->cap) * sizeof(*st));
	rk->st = st;
	rk->cap = (uint32_t)cap;
	return &rk->st[c];
}

/* ---- eviction heaps ----------------------------------------------------- */

static bool slot_before(const ckv_engine *e, const ckv_slot *a, const ckv_slot *b)
{
	if (e->o.policy == CKV_POLICY_ATTN && a->key != b->key)
		return a->key < b->key;
	return a->hseq < b->hseq;
}

static void heap_set(ckv_engine *e, int h, size_t i, ckv_slot *s)
{
	e->heap[h][i] = s;
	s->heap_idx = i;
}

static void heap_up(ckv_engine *e, int h, size_t i)
{
	ckv_slot *s = e->heap[h][i];

	while (i > 0) {
		size_t p = (i - 1) / 2;

		if (!slot_before(e, s, e->heap[h][p]))
			break;
		heap_set(e, h, i, e->heap[h][p]);
		i = p;
	}
	heap_set(e, h, i, s);
}

static void heap_down(ckv_engine *e, int h, size_t i)
{
	size_t n = e->heap_len[h];
	ckv_slot *s = e->heap[h][i];

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= n)
			break;
		if (c + 1 < n && slot_before(e, e->heap[h][c + 1], e->heap[h][c]))
			c++;
		if (!slot_before(e, e->heap[h][c], s))
			break;
		heap_set(e, h, i, e->heap[h][c]);
		i = c;
	}
	heap_set(e, h, i, s);
}

/* S of a resident chunk in normalised units (see top). */
static double slot_score(const ckv_slot *s)
{
	const struct rstat *r = rstat_get(s->f->rk, s->chunk, false);

	if (!r)
		return 0;
	return (r->i_hat + CKV_SCORE_EPS * r->f_hat) * r->f_hat;
}

/* Take a slot's key now; returns the heap it belongs in. */
static int slot_key(ckv_engine *e, ckv_slot *s)
{
	int h = 0;

	s->hseq = s->seq;
	s->rekey = false;
	if (e->o.policy == CKV_POLICY_ATTN) {
		const struct rstat *r = rstat_get(s->f->rk, s->chunk, false);

		s->key = slot_score(s);
		h = r && r->i_hat > 0 ? 1 : 0;
	}
	return h;
}

/* Make an unpinned resident slot evictable. Capacity is reserved per slab. */
static void heap_insert(ckv_engine *e, ckv_slot *s)
{
	int h;

	assert(s->heap == HEAP_NONE && s->pins == 0 && s->state == SLOT_READY && !s->detached);
	h = slot_key(e, s);
	assert(e->heap_len[h] < e->heap_cap[h]);
	s->heap = (uint8_t)(h + 1);
	e->heap[h][e->heap_len[h]] = s;
	s->heap_idx = e->heap_len[h]++;
	heap_up(e, h, s->heap_idx);
}

static void heap_remove(ckv_engine *e, ckv_slot *s)
{
	int h = s->heap - 1;
	size_t i = s->heap_idx;

	assert(s->heap != HEAP_NONE && e->heap[h][i] == s);
	s->heap = HEAP_NONE;
	s->rekey = false;
	e->heap_len[h]--;
	if (i == e->heap_len[h])
		return;
	heap_set(e, h, i, e->heap[h][e->heap_len[h]]);
	heap_down(e, h, i);
	heap_up(e, h, e->heap[h][i]->heap_idx);
}

/* Re-rank a resident chunk whose retention record changed (S may drop: at once). */
static void slot_rekey(ckv_engine *e, ckv_slot *s)
{
	if (s->heap == HEAP_NONE || e->o.policy != CKV_POLICY_ATTN)
		return;
	heap_remove(e, s);
	if (s->pins == 0)
		heap_insert(e, s); /* pinned: its release puts it back */
}

/*
 * Put heap h's top right (see the top of the file): pinned tops leave, a
 * marked top takes its key now and sinks. Afterwards the top, if any, is
 * unpinned and its stored key is its true one.
 */
static void heap_settle(ckv_engine *e, int h)
{
	while (e->heap_len[h]) {
		ckv_slot *s = e->heap[h][0];

		if (s->pins) {
			heap_remove(e, s);
		} else if (s->rekey) {
			if (slot_key(e, s) == h) {
				heap_down(e, h, 0);
			} else { /* its class changed: the other heap */
				heap_remove(e, s);
				heap_insert(e, s);
			}
		} else {
			return;
		}
	}
}

static void heapify(ckv_engine *e, int h)
{
	for (size_t i = e->heap_len[h] / 2; i-- > 0;)
		heap_down(e, h, i);
}

/* ---- decay -------------------------------------------------------------- */

/* Move the epoch to now: every normalised value shrinks by 2^-x. */
static void rebase(ckv_engine *e, double x, double now)
{
	double k = exp2(-x);

	for (size_t b = 0; b < e->rk_nb; b++)
		for (struct rkey *rk = e->rk_tab[b]; rk; rk = rk->next)
			for (uint32_t c = 0; c < rk->cap; c++) {
				rk->st[c].i_hat *= k;
				rk->st[c].f_hat *= k;
			}
	e->epoch = now;
	if (e->o.policy != CKV_POLICY_ATTN)
		return;
	for (int h = 0; h < 2; h++) {
		for (size_t i = 0; i < e->heap_len[h]; i++) {
			ckv_slot *s = e->heap[h][i];

			s->key = slot_score(s);
			s->hseq = s->seq;
			s->rekey = false;
		}
		heapify(e, h);
	}
}

/* 2^((now - epoch) / h): what one unit added now is worth, normalised. */
static double decay_scale(ckv_engine *e)
{
	if (isinf(e->o.halflife_s))
		return 1.0;
	double now = mono_now();
	double x = (now - e->epoch) / e->o.halflife_s;

	if (x > CKV_REBASE_HALFLIVES) {
		rebase(e, x, now);
		x = 0;
	}
	return exp2(x);
}

/* A demand access (counted in F) of chunk c at wall time now; also refreshes last. */
static void note_access(ckv_efile *f, uint32_t c, double scale, bool count, int64_t now)
{
	struct rstat *r = rstat_get(f->rk, c, true);

	if (!r)
		return; /* ENOMEM: retention is advisory */
	if (count)
		r->f_hat += scale;
	r->last = now;
}

/* ---- arena: pages, slabs, slots ----------------------------------------- */

static uint64_t page_len(const ckv_engine *e, uint32_t p)
{
	uint64_t off = (uint64_t)p * CKV_PAGE_BYTES;

	return e->arena_size - off < CKV_PAGE_BYTES ? e->arena_size - off : CKV_PAGE_BYTES;
}

static struct sclass *class_get(ckv_engine *e, uint64_t stride)
{
	for (size_t i = 0; i < e->nclasses; i++)
		if (e->classes[i]->stride == stride)
			return e->classes[i];

	struct sclass **v = realloc(e->classes, (e->nclasses + 1) * sizeof(*v));

	if (!v)
		return NULL;
	e->classes = v;
	struct sclass *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->stride = stride;
	e->classes[e->nclasses++] = c;
	return c;
}

static void partial_add(struct sclass *c, struct slab *sl)
{
	if (sl->on_partial)
		return;
	sl->pprev = NULL;
	sl->pnext = c->partial;
	if (c->partial)
		c->partial->pprev = sl;
	c->partial = sl;
	sl->on_partial = true;
}

static void partial_del(struct sclass *c, struct slab *sl)
{
	if (!sl->on_partial)
		return;
	if (sl->pprev)
		sl->pprev->pnext = sl->pnext;
	else
		c->partial = sl->pnext;
	if (sl->pnext)
		sl->pnext->pprev = sl->pprev;
	sl->on_partial = false;
}

static bool heaps_reserve(ckv_engine *e, uint64_t nslots)
{
	for (int h = 0; h < 2; h++) {
		if (e->heap_cap[h] >= nslots)
			continue;
		size_t cap = e->heap_cap[h] ? e->heap_cap[h] : 256;

		while (cap < nslots)
			cap *= 2;
		ckv_slot **v = realloc(e->heap[h], cap * sizeof(*v));

		if (!v)
			return false;
		e->heap[h] = v;
		e->heap_cap[h] = cap;
	}
	return true;
}

/* Carve free pages into a new slab for class c; false when none fit. */
static bool slab_new(ckv_engine *e, struct sclass *c)
{
	uint32_t k = (uint32_t)((c->stride + CKV_PAGE_BYTES - 1) / CKV_PAGE_BYTES);

	if (e->free_pages < k || k > e->npages)
		return false;
	for (uint32_t t = 0; t + k <= e->npages; t++) {
		uint32_t p = (e->page_hint + t) % e->npages;
		uint64_t len = 0;
		uint32_t j;

		if (p + k > e->npages)
			continue;
		for (j = 0; j < k && !e->page_slab[p + j]; j++)
			len += page_len(e, p + j);
		if (j < k || len < c->stride)
			continue;

		uint32_t nslots = (uint32_t)(len / c->stride);

		if (!heaps_reserve(e, e->total_slots + nslots))
			return false;
		struct slab *sl = calloc(1, sizeof(*sl) + nslots * sizeof(ckv_slot));

		if (!sl)
			return false;
		sl->cls = c;
		sl->first_page = p;
		sl->npages = k;
		sl->nslots = sl->nfree = nslots;
		for (uint32_t i = nslots; i-- > 0;) {
			ckv_slot *s = &sl->slots[i];

			s->off = (uint64_t)p * CKV_PAGE_BYTES + (uint64_t)i * c->stride;
			s->data = e->base + s->off;
			s->slab = sl;
			s->qnext = sl->free;
			sl->free = s;
		}
		for (j = 0; j < k; j++)
			e->page_slab[p + j] = sl;
		e->free_pages -= k;
		e->page_hint = (p + k) % e->npages;
		e->total_slots += nslots;
		partial_add(c, sl);
		return true;
	}
	return false;
}

static void slab_release(ckv_engine *e, struct slab *sl)
{
	partial_del(sl->cls, sl);
	for (uint32_t j = 0; j < sl->npages; j++)
		e->page_slab[sl->first_page + j] = NULL;
	e->free_pages += sl->npages;
	e->total_slots -= sl->nslots;
	free(sl);
}

static void efile_free(ckv_engine *e, ckv_efile *f)
{
	if (f->rk->live == f)
		f->rk->live = NULL;
	if (f->prev)
		f->prev->next = f->next;
	else
		e->files = f->next;
	if (f->next)
		f->next->prev = f->prev;
	if (f->fd >= 0)
		close(f->fd);
	if (f->dirfd >= 0)
		close(f->dirfd);
	free(f->relpath);
	free(f->sums);
	free(f->ent);
	free(f);
}

/* Close what nobody needs any more: the fd once no user and no read, the
 * struct once no slot names it either. */
static void efile_settle(ckv_engine *e, ckv_efile *f)
{
	if (f->users > 0)
		return;
	if (f->nreading == 0 && f->fd >= 0) {
		close(f->fd);
		f->fd = -1;
	}
	if (f->nslots == 0)
		efile_free(e, f);
}

/* Return a slot (no heap, no pins, no waiters) to its slab or the heap allocator. */
static void slot_free(ckv_engine *e, ckv_slot *s)
{
	ckv_efile *f = s->f;

	assert(s->pins == 0 && s->heap == HEAP_NONE && !s->waiters && s->queue == Q_NONE);
	if (s->detached) {
		e->detached_bytes -= f->stride;
		free(s->data);
		free(s);
	} else {
		struct slab *sl = s->slab;

		if (f->ent[s->chunk] == s)
			f->ent[s->chunk] = NULL;
		s->state = SLOT_FREE;
		s->f = NULL;
		s->prefetched = false;
		s->qnext = sl->free;
		sl->free = s;
		e->st.slots_used--;
		e->st.arena_used -= sl->cls->stride;
		if (++sl->nfree == sl->nslots)
			slab_release(e, sl);
		else
			partial_add(sl->cls, sl);
	}
	assert(f->nslots > 0);
	f->nslots--;
	efile_settle(e, f);
}

static void slot_evict(ckv_engine *e, ckv_slot *s)
{
	heap_remove(e, s);
	e->st.evictions++;
	slot_free(e, s);
}

static ckv_slot *victim(ckv_engine *e, bool stream)
{
	ckv_slot *a, *b;

	heap_settle(e, 0);
	heap_settle(e, 1);
	a = e->heap_len[0] ? e->heap[0][0] : NULL;
	b = e->heap_len[1] ? e->heap[1][0] : NULL;

	if (stream || !b)
		return a; /* under LRU everything is in heap 0 */
	if (!a)
		return b;
	return slot_before(e, a, b) ? a : b;
}

/*
 * An arena slot of the given stride, evicting as needed (streaming reads
 * only chunks without importance). NULL when nothing more can be evicted.
 */
static ckv_slot *slot_alloc(ckv_engine *e, uint64_t stride, bool stream)
{
	struct sclass *c;

	if (stride > e->arena_size)
		return NULL;
	c = class_get(e, stride);
	if (!c)
		return NULL;
	for (;;) {
		struct slab *sl = c->partial;

		if (sl || (slab_new(e, c) && (sl = c->partial))) {
			ckv_slot *s = sl->free;

			sl->free = s->qnext;
			s->qnext = NULL;
			if (--sl->nfree == 0)
				partial_del(c, sl);
			e->st.slots_used++;
			e->st.arena_used += stride;
			return s;
		}
		ckv_slot *v = victim(e, stream);

		if (!v)
			return NULL;
		slot_evict(e, v);
	}
}

static ckv_slot *slot_alloc_detached(ckv_engine *e, uint64_t stride)
{
	ckv_slot *s;

	if (e->detached_bytes + stride > CKV_DETACHED_MAX)
		return NULL;
	s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	if (posix_memalign(&s->data, CKV_SLOT_ALIGN, stride) != 0) {
		free(s);
		return NULL;
	}
	s->off = CKV_SLOT_DETACHED;
	s->detached = true;
	e->detached_bytes += stride;
	return s;
}

/* A get's pin: a slot in a heap stays there, marked for re-keying (see the top of the file). */
static void slot_pin(ckv_engine *e, ckv_slot *s)
{
	if (s->heap != HEAP_NONE)
		s->rekey = true;
	if (s->pins++ == 0 && !s->detached)
		e->st.pinned++;
}

/* ---- completion --------------------------------------------------------- */

static void waiter_done(ckv_engine *e, struct waiter *w, ckv_slot *s, int rc)
{
	struct getreq *r = w->req;

	r->slots[w->i] = s;
	r->rcs[w->i] = rc;
	if (r->cb && r->inline_open) {
		w->next = NULL;
		if (r->inl_tail)
			r->inl_tail->next = w;
		else
			r->inl = w;
		r->inl_tail = w;
	} else if (r->cb) {
		w->next = NULL;
		if (e->deliver_tail)
			e->deliver_tail->next = w;
		else
			e->deliver = w;
		e->deliver_tail = w;
	} else if (--r->remaining == 0) {
		pthread_cond_signal(&r->cv);
	}
}

/* A read of slot s ended with rc; wake its waiters. e->lock held. */
static void slot_complete(ckv_engine *e, ckv_slot *s, int rc)
{
	ckv_efile *f = s->f;
	struct waiter *w, *next;

	assert(s->state == SLOT_READING && s->queue == Q_NONE && f->nreading > 0);
	f->nreading--;
	w = s->waiters;
	s->waiters = NULL;
	if (rc == 0) {
		s->state = SLOT_READY;
		for (; w; w = next) {
			next = w->next;
			waiter_done(e, w, s, 0);
		}
		if (s->pins == 0 && !s->detached) {
			if (f->stale) {
				e->st.evictions++;
				slot_free(e, s);
			} else {
				heap_insert(e, s);
			}
		}
		return;
	}
	for (; w; w = next) {
		next = w->next;
		waiter_done(e, w, NULL, rc);
	}
	if (s->pins && !s->detached)
		e->st.pinned--;
	s->pins = 0;
	slot_free(e, s);
}

/* ---- the I/O thread ----------------------------------------------------- */

static int efile_open(ckv_engine *e, ckv_efile *f)
{
	int flags = O_RDONLY | O_CLOEXEC;

	f->direct = !e->o.no_direct;
	f->fd = openat(f->dirfd, f->relpath, flags | (f->direct ? O_DIRECT : 0));
	if (f->fd < 0 && errno == EINVAL && f->direct) {
		f->direct = false;
		f->fd = openat(f->dirfd, f->relpath, flags);
	}
	return f->fd < 0 ? -errno : 0;
}

/* By file (in the order io_build ranked them), then chunk. */
static int slot_cmp(const void *pa, const void *pb)
{
	const ckv_slot *a = *(ckv_slot *const *)pa, *b = *(ckv_slot *const *)pb;

	if (a->f != b->f)
		return a->f->rank < b->f->rank ? -1 : 1;
	return a->chunk < b->chunk ? -1 : a->chunk > b->chunk;
}

static void op_prep(ckv_engine *e, struct rdop *op)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);

	assert(sqe); /* the ring has queue_depth + 1 entries, inflight <= queue_depth */
	io_uring_prep_readv(sqe, op->f->fd, op->iov + op->iov_first, op->n - op->iov_first,
			    op->off + op->done);
	io_uring_sqe_set_data(sqe, op);
}

/* Turn a sorted run of n queued slots into one read, or fail them. */
static void run_submit(ckv_engine *e, ckv_slot **run, uint32_t n, bool idle)
{
	ckv_efile *f = run[0]->f;
	struct rdop *op;
	int rc = 0;

	if (f->fd < 0)
		rc = efile_open(e, f);
	if (rc < 0) {
		elog(e, "ckv engine: %s: open %s: %s", f->rk->key, f->relpath, strerror(-rc));
		e->st.io_errors++;
		for (uint32_t i = 0; i < n; i++)
			slot_complete(e, run[i], rc);
		return;
	}
	op = calloc(1, sizeof(*op) + n * (sizeof(ckv_slot *) + sizeof(int) + sizeof(struct iovec)));
	if (!op) {
		for (uint32_t i = 0; i < n; i++)
			slot_complete(e, run[i], -ENOMEM);
		return;
	}
	op->iov = (struct iovec *)(op + 1);
	op->slots = (ckv_slot **)(op->iov + n);
	op->rcs = (int *)(op->slots + n);
	op->f = f;
	op->n = n;
	op->off = f->base + (uint64_t)run[0]->chunk * f->pitch;
	op->total = (uint64_t)n * f->chunk_bytes;
	for (uint32_t i = 0; i < n; i++) {
		op->slots[i] = run[i];
		op->iov[i].iov_base = run[i]->data;
		op->iov[i].iov_len = f->chunk_bytes;
	}
	op->idle = idle;
	e->inflight++;
	e->inflight_idle += idle;
	e->st.disk_reads++;
	op_prep(e, op);
}

/*
 * Take queued chunks while the ring has room: demand first, then
 * background; adjacent chunks of one file become one read. e->lock held.
 */
static void io_build(ckv_engine *e)
{
	struct rdop *op;

	while ((op = e->retry)) {
		e->retry = op->next;
		if (op->reopen && op->f->direct) {
			close(op->f->fd);
			op->f->fd = -1;
			op->f->direct = false;
			op->f->fd = openat(op->f->dirfd, op->f->relpath, O_RDONLY | O_CLOEXEC);
			if (op->f->fd < 0)
				elog(e, "ckv engine: %s: reopen %s: %s", op->f->rk->key,
				     op->f->relpath, strerror(errno));
		}
		op->reopen = false;
		op_prep(e, op);
	}
	if (e->stopping) {
		ckv_slot *s;

		while ((s = q_pop(&e->qbg))) {
			s->queue = Q_NONE;
			slot_complete(e, s, -ECANCELED);
		}
	}

	struct squeue *queues[3] = { &e->qdemand, &e->qbg, &e->qidle };

	for (int qi = 0; qi < 3; qi++) {
		struct squeue *q = queues[qi];
		bool idle = qi == 2;

		/* idle reads only while nothing else is queued or in flight (see top) */
		if (idle && !e->stopping &&
		    (e->qdemand.len || e->qbg.len || e->inflight > e->inflight_idle))
			break;
		while (e->inflight < e->o.queue_depth && q->len &&
		       (!idle || e->stopping || e->inflight_idle < e->o.idle_depth)) {
			size_t cap = e->o.queue_depth - e->inflight;
			size_t m = 0, i, j;
			uint32_t nrank = 0;

			if (idle && !e->stopping && cap > e->o.idle_depth - e->inflight_idle)
				cap = e->o.idle_depth - e->inflight_idle;
			e->rank_gen++;
			while (m < cap * CKV_MAX_IOV && q->len) {
				ckv_slot *s = q_pop(q);

				s->queue = Q_NONE;
				e->batch[m++] = s;
				if (s->f->rank_gen != e->rank_gen) { /* first chunk of its file */
					s->f->rank_gen = e->rank_gen;
					s->f->rank = nrank++;
				}
			}
			qsort(e->batch, m, sizeof(*e->batch), slot_cmp);
			for (i = 0; i < m; i = j) {
				for (j = i + 1; j < m && j - i < CKV_MAX_IOV &&
						e->batch[j]->f == e->batch[i]->f &&
						e->batch[i]->f->pitch == e->batch[i]->f->chunk_bytes &&
						e->batch[j]->chunk == e->batch[j - 1]->chunk + 1;
				     j++)
					;
				if (e->inflight >= e->o.queue_depth ||
				    (idle && !e->stopping && e->inflight_idle >= e->o.idle_depth))
					break;
				run_submit(e, e->batch + i, (uint32_t)(j - i), idle);
			}
			/* What did not fit goes back in front, in order. */
			for (size_t k = m; k-- > i;) {
				e->batch[k]->queue = (uint8_t)(qi == 0 ? Q_DEMAND : qi == 1 ? Q_BG : Q_IDLE);
				q_push(q, e->batch[k], true);
			}
		}
	}
}

/* Verify the chunks of a finished read; no lock (the slots are READING). */
static void op_verify(ckv_engine *e, struct rdop *op)
{
	ckv_efile *f = op->f;

	if (op->rc < 0)
		elog(e, "ckv engine: %s chunks %u-%u: read %s: %s", f->rk->key, op->slots[0]->chunk,
		     op->slots[op->n - 1]->chunk, f->relpath,
		     op->rc == -EIO && op->done < op->total ? "short file" : strerror(-op->rc));
	for (uint32_t i = 0; i < op->n; i++) {
		ckv_slot *s = op->slots[i];

		if (op->done < (uint64_t)(i + 1) * f->chunk_bytes) {
			op->rcs[i] = op->rc < 0 ? op->rc : -EIO;
			continue;
		}
		op->rcs[i] = 0;
		if (!f->sums)
			continue;
		uint64_t got = XXH3_64bits(s->data, f->chunk_bytes);

		if (got != f->sums[s->chunk]) {
			op->rcs[i] = -EIO;
			elog(e,
			     "ckv engine: %s chunk %u: checksum mismatch (expected %016llx, read %016llx); "
			     "not served",
			     f->rk->key, s->chunk, (unsigned long long)f->sums[s->chunk],
			     (unsigned long long)got);
		}
	}
}

/* Handle one completion; finished reads go on *done. */
static void op_cqe(ckv_engine *e, struct rdop *op, int res, struct rdop **done)
{
	if (res == -EAGAIN || res == -EINTR) {
		goto requeue;
	} else if (res == -EINVAL && op->f->direct) {
		op->reopen = true; /* O_DIRECT refused here: go buffered */
		goto requeue;
	} else if (res < 0) {
		op->rc = res;
	} else if (res == 0) {
		op->rc = -EIO; /* EOF inside the run: the file is short */
	} else {
		uint64_t skip = (uint64_t)res;

		op->done += skip;
		if (op->done < op->total) {
			while (skip) {
				struct iovec *v = &op->iov[op->iov_first];

				if (skip >= v->iov_len) {
					skip -= v->iov_len;
					op->iov_first++;
				} else {
					v->iov_base = (char *)v->iov_base + skip;
					v->iov_len -= skip;
					skip = 0;
				}
			}
			goto requeue;
		}
	}
	op->next = *done;
	*done = op;
	return;
requeue:
	op->next = e->retry;
	e->retry = op;
}

static void deliver_all(struct waiter *w)
{
	struct waiter *next;

	for (; w; w = next) {
		struct getreq *r = w->req;
		size_t n = r->n; /* once counted, r may be another thread's to free */

		next = w->next;
		r->cb(r->arg, w->i, r->slots[w->i], r->rcs[w->i]);
		if (atomic_fetch_add_explicit(&r->delivered, 1, memory_order_acq_rel) + 1 == n)
			free(r);
	}
}

static void *io_main(void *arg)
{
	ckv_engine *e = arg;
	struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);

	io_uring_prep_read(sqe, e->evfd, &e->evbuf, sizeof(e->evbuf), 0);
	io_uring_sqe_set_data(sqe, &e->evbuf);
	for (;;) {
		struct waiter *dl;
		bool finish;

		pthread_mutex_lock(&e->lock);
		io_build(e);
		dl = e->deliver;
		e->deliver = e->deliver_tail = NULL;
		finish = e->stopping && !dl && !e->qdemand.len && !e->qbg.len && !e->qidle.len &&
			 !e->inflight &&
			 !e->retry;
		pthread_mutex_unlock(&e->lock);

		if (dl) {
			io_uring_submit(&e->ring);
			deliver_all(dl);
			continue; /* callbacks may have queued more */
		}
		if (finish)
			break;

		int rc = io_uring_submit_and_wait(&e->ring, 1);

		if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
			elog(e, "ckv engine: io_uring_submit: %s", strerror(-rc));
			usleep(1000);
		}

		struct io_uring_cqe *cqe;
		struct rdop *done = NULL, *op;
		unsigned head, seen = 0;
		bool rearm = false;

		io_uring_for_each_cqe(&e->ring, head, cqe) {
			void *data = io_uring_cqe_get_data(cqe);

			seen++;
			if (data == &e->evbuf)
				rearm = true;
			else
				op_cqe(e, data, cqe->res, &done);
		}
		io_uring_cq_advance(&e->ring, seen);
		if (rearm) {
			sqe = io_uring_get_sqe(&e->ring);
			io_uring_prep_read(sqe, e->evfd, &e->evbuf, sizeof(e->evbuf), 0);
			io_uring_sqe_set_data(sqe, &e->evbuf);
		}
		if (!done)
			continue;
		for (op = done; op; op = op->next)
			op_verify(e, op);

		pthread_mutex_lock(&e->lock);
		while ((op = done)) {
			done = op->next;
			e->st.bytes_from_disk += op->done;
			if (op->rc < 0)
				e->st.io_errors++;
			for (uint32_t i = 0; i < op->n; i++) {
				if (op->rcs[i] == -EIO && op->done >= (uint64_t)(i + 1) * op->f->chunk_bytes)
					e->st.checksum_failures++;
				slot_complete(e, op->slots[i], op->rcs[i]);
			}
			e->inflight--;
			e->inflight_idle -= op->idle;
			free(op);
		}
		pthread_mutex_unlock(&e->lock);
	}
	return NULL;
}

/* ---- open / close ------------------------------------------------------- */

int ckv_engine_open(const ckv_engine_opts *o, ckv_engine **out)
{
	ckv_engine *e;
	int rc;

	if (!out)
		return -EINVAL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	if (o)
		e->o = *o;
	if (!e->o.arena_bytes)
		e->o.arena_bytes = CKV_DEFAULT_ARENA;
	if (!e->o.queue_depth)
		e->o.queue_depth = CKV_DEFAULT_QD;
	if (e->o.queue_depth > CKV_MAX_QD)
		e->o.queue_depth = CKV_MAX_QD;
	if (!e->o.idle_depth)
		e->o.idle_depth = CKV_DEFAULT_IDLE_QD;
	if (e->o.idle_depth > e->o.queue_depth)
		e->o.idle_depth = e->o.queue_depth;
	if (!(e->o.halflife_s > 0)) /* also NaN */
		e->o.halflife_s = CKV_DEFAULT_HALFLIFE;
	if (!e->o.log)
		e->o.log = default_log;
	if (e->o.policy != CKV_POLICY_ATTN && e->o.policy != CKV_POLICY_LRU) {
		rc = -EINVAL;
		goto out_free;
	}
	e->arena_size = (e->o.arena_bytes + CKV_SLOT_ALIGN - 1) & ~(CKV_SLOT_ALIGN - 1);
	e->npages = (uint32_t)((e->arena_size + CKV_PAGE_BYTES - 1) / CKV_PAGE_BYTES);
	e->free_pages = e->npages;
	e->epoch = mono_now();
	e->rk_nb = 64;

	rc = pthread_mutex_init(&e->lock, NULL);
	if (rc) {
		rc = -rc;
		goto out_free;
	}
	e->page_slab = calloc(e->npages, sizeof(*e->page_slab));
	e->rk_tab = calloc(e->rk_nb, sizeof(*e->rk_tab));
	e->batch = calloc((size_t)e->o.queue_depth * CKV_MAX_IOV, sizeof(*e->batch));
	if (!e->page_slab || !e->rk_tab || !e->batch) {
		rc = -ENOMEM;
		goto out_free_tables;
	}
	e->memfd = memfd_create("ckv-arena", MFD_CLOEXEC);
	if (e->memfd < 0) {
		rc = -errno;
		goto out_free_tables;
	}
	if (ftruncate(e->memfd, (off_t)e->arena_size) < 0) {
		rc = -errno;
		goto out_close_memfd;
	}
	e->base = mmap(NULL, e->arena_size, PROT_READ | PROT_WRITE, MAP_SHARED, e->memfd, 0);
	if (e->base == MAP_FAILED) {
		rc = -errno;
		goto out_close_memfd;
	}
	e->evfd = eventfd(0, EFD_CLOEXEC);
	if (e->evfd < 0) {
		rc = -errno;
		goto out_unmap;
	}
	rc = io_uring_queue_init(e->o.queue_depth + 1, &e->ring, 0);
	if (rc < 0)
		goto out_close_evfd;
	rc = pthread_create(&e->io_thread, NULL, io_main, e);
	if (rc) {
		rc = -rc;
		goto out_exit_ring;
	}
	*out = e;
	return 0;

out_exit_ring:
	io_uring_queue_exit(&e->ring);
out_close_evfd:
	close(e->evfd);
out_unmap:
	munmap(e->base, e->arena_size);
out_close_memfd:
	close(e->memfd);
out_free_tables:
	free(e->page_slab);
	free(e->rk_tab);
	free(e->batch);
	pthread_mutex_destroy(&e->lock);
out_free:
	free(e);
	return rc;
}

void ckv_engine_close(ckv_engine *e)
{
	if (!e)
		return;
	pthread_mutex_lock(&e->lock);
	e->stopping = true;
	pthread_mutex_unlock(&e->lock);
	kick(e);
	pthread_join(e->io_thread, NULL);
	io_uring_queue_exit(&e->ring);

	/* The contract says every slot was released; free what is left anyway. */
	for (uint32_t p = 0; p < e->npages; p++) {
		struct slab *sl = e->page_slab[p];

		if (sl && sl->first_page == p) {
			for (uint32_t j = 0; j < sl->npages; j++)
				e->page_slab[p + j] = NULL;
			free(sl);
		}
	}
	while (e->files)
		efile_free(e, e->files);
	for (size_t b = 0; b < e->rk_nb; b++) {
		struct rkey *rk, *next;

		for (rk = e->rk_tab[b]; rk; rk = next) {
			next = rk->next;
			free(rk->key);
			free(rk->st);
			free(rk);
		}
	}
	for (size_t i = 0; i < e->nclasses; i++)
		free(e->classes[i]);
	free(e->classes);
	free(e->heap[0]);
	free(e->heap[1]);
	free(e->rk_tab);
	free(e->page_slab);
	free(e->batch);
	close(e->evfd);
	munmap(e->base, e->arena_size);
	close(e->memfd);
	pthread_mutex_destroy(&e->lock);
	free(e);
}

int ckv_engine_arena_fd(const ckv_engine *e)
{
	return e->memfd;
}

uint64_t ckv_engine_arena_size(const ckv_engine *e)
{
	return e->arena_size;
}

void *ckv_engine_arena_base(const ckv_engine *e)
{
	return e->base;
}

/* ---- files -------------------------------------------------------------- */

static bool efile_same(const ckv_efile *f, uint64_t chunk_bytes, uint64_t pitch, uint64_t base,
		       uint32_t nchunks, const uint64_t *sums)
{
	if (f->chunk_bytes != chunk_bytes || f->pitch != pitch || f->base != base ||
	    f->nchunks != nchunks || !f->sums != !sums)
		return false;
	return !sums || memcmp(f->sums, sums, (size_t)nchunks * sizeof(*sums)) == 0;
}

/* Drop the cached chunks of a file that a new registration replaced. */
static void efile_retire(ckv_engine *e, ckv_efile *f)
{
	f->stale = true;
	f->rk->live = NULL;
	f->nslots++; /* keep f alive while its slots go */
	for (uint32_t c = 0; c < f->nchunks; c++) {
		ckv_slot *s = f->ent[c];

		if (s && s->heap != HEAP_NONE) {
			if (s->pins)
				heap_remove(e, s); /* its release frees it */
			else
				slot_evict(e, s);
		}
	}
	assert(f->nslots > 0);
	f->nslots--;
	efile_settle(e, f);
}

int ckv_engine_file_get(ckv_engine *e, int dirfd, const char *relpath, const char *key,
			uint64_t chunk_bytes, uint32_t nchunks, const uint64_t *sums,
			ckv_efile **out)
{
	return ckv_engine_file_get_part(e, dirfd, relpath, key, chunk_bytes, chunk_bytes, 0, nchunks,
					sums, out);
}

int ckv_engine_file_get_part(ckv_engine *e, int dirfd, const char *relpath, const char *key,
			     uint64_t chunk_bytes, uint64_t pitch, uint64_t base, uint32_t nchunks,
			     const uint64_t *sums, ckv_efile **out)
{
	ckv_efile *f;
	struct rkey *rk;
	int rc;

	if (!e || !relpath || !key || !out || chunk_bytes == 0 || pitch < chunk_bytes ||
	    pitch > (UINT64_MAX >> 2) / (nchunks ? nchunks : 1) || base > pitch)
		return -EINVAL;

	pthread_mutex_lock(&e->lock);
	rk = rkey_find(e, key, true);
	if (!rk) {
		rc = -ENOMEM;
		goto out_unlock;
	}
	f = rk->live;
	if (f && efile_same(f, chunk_bytes, pitch, base, nchunks, sums)) {
		if (f->users == 0 && f->fd < 0) {
			/* Cached chunks only: take the caller's current location. */
			int nd = dirfd == AT_FDCWD ? AT_FDCWD : fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
			char *np = strdup(relpath);

			if (nd == -1 || !np) {
				rc = nd == -1 ? -errno : -ENOMEM;
				if (nd >= 0)
					close(nd);
				free(np);
				goto out_unlock;
			}
			if (f->dirfd >= 0)
				close(f->dirfd);
			free(f->relpath);
			f->dirfd = nd;
			f->relpath = np;
		}
		f->users++;
		*out = f;
		rc = 0;
		goto out_unlock;
	}
	if (f && f->users > 0) {
		elog(e, "ckv engine: %s: registered again with another chunk size, count or sums",
		     key);
		rc = -EINVAL;
		goto out_unlock;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		rc = -ENOMEM;
		goto out_unlock;
	}
	f->rk = rk;
	f->chunk_bytes = chunk_bytes;
	f->pitch = pitch;
	f->base = base;
	f->stride = (chunk_bytes + CKV_SLOT_ALIGN - 1) & ~(CKV_SLOT_ALIGN - 1);
	f->nchunks = nchunks;
	f->fd = -1;
	f->dirfd = -1;
	f->relpath = strdup(relpath);
	f->ent = calloc(nchunks ? nchunks : 1, sizeof(*f->ent));
	if (sums) {
		f->sums = malloc((nchunks ? nchunks : 1) * sizeof(*sums));
		if (f->sums)
			memcpy(f->sums, sums, (size_t)nchunks * sizeof(*sums));
	}
	if (!f->relpath || !f->ent || (sums && !f->sums)) {
		rc = -ENOMEM;
		goto out_free_file;
	}
	f->dirfd = dirfd == AT_FDCWD ? AT_FDCWD : fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
	if (f->dirfd == -1) {
		rc = -errno;
		goto out_free_file;
	}
	if (rk->live)
		efile_retire(e, rk->live);
	rk->live = f;
	f->users = 1;
	f->next = e->files;
	if (e->files)
		e->files->prev = f;
	e->files = f;
	*out = f;
	pthread_mutex_unlock(&e->lock);
	return 0;

out_free_file:
	free(f->relpath);
	free(f->ent);
	free(f->sums);
	free(f);
out_unlock:
	pthread_mutex_unlock(&e->lock);
	return rc;
}

void ckv_engine_file_put(ckv_engine *e, ckv_efile *f)
{
	if (!f)
		return;
	pthread_mutex_lock(&e->lock);
	assert(f->users > 0);
	f->users--;
	efile_settle(e, f);
	pthread_mutex_unlock(&e->lock);
}

const char *ckv_efile_key(const ckv_efile *f)
{
	return f->rk->key;
}

/* ---- slots -------------------------------------------------------------- */

const void *ckv_slot_data(const ckv_slot *s)
{
	return s->data;
}

uint64_t ckv_slot_offset(const ckv_slot *s)
{
	return s->off;
}

uint64_t ckv_slot_len(const ckv_slot *s)
{
	return s->len;
}

/* ---- get ---------------------------------------------------------------- */

/*
 * A get's access of chunk c of f, whose slot s exists (resident, or being
 * read): counted, pinned, its recency refreshed. e->lock held.
 */
static void access_hit(ckv_engine *e, ckv_efile *f, uint32_t c, ckv_slot *s, bool stream,
		       double scale, int64_t now)
{
	if (!stream)
		note_access(f, c, scale, !s->prefetched, now); /* a prefetch already counted it */
	if (s->state == SLOT_READY || s->prefetched)
		e->st.hits++;
	else
		e->st.misses++;
	if (s->prefetched) {
		e->st.readahead_used++;
		s->prefetched = false;
	}
	slot_pin(e, s);
	s->seq = ++e->seq;
}

/*
 * Resolve every ref of r: hits complete at once, misses get a slot and a
 * place in the demand queue. Returns whether the I/O thread must look.
 * e->lock held.
 */
static bool get_submit(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
		       struct getreq *r)
{
	bool stream = flags & CKV_GET_STREAM;
	bool idle = flags & CKV_GET_IDLE;
	double scale = decay_scale(e);
	int64_t now = (int64_t)time(NULL);
	bool wake = false;

	for (size_t i = 0; i < n; i++) {
		struct waiter *w = &r->w[i];
		ckv_efile *f = refs[i].file;
		uint32_t c = refs[i].chunk;
		ckv_slot *s;

		w->req = r;
		w->i = i;
		if (!f || c >= f->nchunks) {
			waiter_done(e, w, NULL, -EINVAL);
			continue;
		}
		s = f->ent[c];
		if (s) {
			access_hit(e, f, c, s, stream, scale, now);
			if (s->state == SLOT_READY) {
				waiter_done(e, w, s, 0);
				continue;
			}
			w->next = s->waiters;
			s->waiters = w;
			if (s->queue == Q_BG || (s->queue == Q_IDLE && !idle)) { /* a reader waits now */
				q_remove(s->queue == Q_BG ? &e->qbg : &e->qidle, s);
				s->queue = Q_DEMAND;
				q_push(&e->qdemand, s, true);
				wake = true;
			}
			continue;
		}

		if (!stream)
			note_access(f, c, scale, true, now);
		e->st.misses++;
		s = slot_alloc(e, f->stride, stream);
		if (!s && stream)
			s = slot_alloc_detached(e, f->stride);
		if (!s) {
			waiter_done(e, w, NULL, -ENOMEM);
			continue;
		}
		s->f = f;
		s->chunk = c;
		s->len = f->chunk_bytes;
		s->state = SLOT_READING;
		s->seq = ++e->seq;
		if (!s->detached)
			f->ent[c] = s;
		f->nslots++;
		f->nreading++;
		slot_pin(e, s);
		w->next = NULL;
		s->waiters = w;
		s->queue = idle ? Q_IDLE : Q_DEMAND;
		q_push(idle ? &e->qidle : &e->qdemand, s, false);
		wake = true;
	}
	if (r->cb && e->deliver)
		wake = true;
	return wake;
}

int ckv_engine_get(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
		   ckv_slot **slots, int *rcs)
{
	struct getreq *r;
	int *own_rcs = NULL;
	int rc = 0;

	if (!e || (n && (!refs || !slots)))
		return -EINVAL;
	if (n == 0)
		return 0;
	if (n > (SIZE_MAX - sizeof(*r)) / sizeof(struct waiter) / 2)
		return -EINVAL;
	r = calloc(1, sizeof(*r) + n * sizeof(struct waiter));
	if (!rcs)
		rcs = own_rcs = calloc(n, sizeof(*rcs));
	if (!r || !rcs) {
		free(r);
		free(own_rcs);
		return -ENOMEM;
	}
	r->n = n;
	r->remaining = n;
	r->slots = slots;
	r->rcs = rcs;
	pthread_cond_init(&r->cv, NULL);

	pthread_mutex_lock(&e->lock);
	if (get_submit(e, refs, n, flags, r))
		kick(e);
	while (r->remaining)
		pthread_cond_wait(&r->cv, &e->lock);
	pthread_mutex_unlock(&e->lock);

	for (size_t i = 0; i < n; i++)
		if (rcs[i] < 0) {
			rc = rcs[i];
			break;
		}
	pthread_cond_destroy(&r->cv);
	free(r);
	free(own_rcs);
	return rc;
}

int ckv_engine_get_async(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
			 ckv_get_cb cb, void *arg)
{
	struct getreq *r;
	struct waiter *inl;
	size_t sz;

	if (!e || !cb || (n && !refs))
		return -EINVAL;
	if (n == 0)
		return 0;
	if (n > (SIZE_MAX - sizeof(*r)) / (sizeof(struct waiter) + sizeof(ckv_slot *) + sizeof(int)) / 2)
		return -EINVAL;
	sz = sizeof(*r) + n * (sizeof(struct waiter) + sizeof(ckv_slot *) + sizeof(int));
	r = calloc(1, sz);
	if (!r)
		return -ENOMEM;
	r->n = n;
	r->slots = (ckv_slot **)&r->w[n];
	r->rcs = (int *)(r->slots + n);
	r->cb = cb;
	r->arg = arg;
	atomic_init(&r->delivered, 0);

	pthread_mutex_lock(&e->lock);
	r->inline_open = flags & CKV_GET_INLINE;
	if (get_submit(e, refs, n, flags, r))
		kick(e);
	r->inline_open = false;
	inl = r->inl;
	pthread_mutex_unlock(&e->lock);
	/* r may be freed by the last callback: inl is ours, r no longer */
	if (inl)
		deliver_all(inl);
	return 0; /* r belongs to the I/O thread now; freed after the last callback */
}

int ckv_engine_get_ready(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
			 ckv_slot **slots)
{
	bool stream = flags & CKV_GET_STREAM;
	size_t left = 0;
	double scale;
	int64_t now;

	if (!e || (n && (!refs || !slots)) || n > INT_MAX)
		return -EINVAL;
	if (n == 0)
		return 0;
	now = (int64_t)time(NULL);
	pthread_mutex_lock(&e->lock);
	for (size_t i = 0; i < n; i++) {
		ckv_efile *f = refs[i].file;
		uint32_t c = refs[i].chunk;
		ckv_slot *s = f && c < f->nchunks ? f->ent[c] : NULL;

		slots[i] = s && s->state == SLOT_READY ? s : NULL;
		left += slots[i] == NULL;
	}
	if (left && (flags & CKV_GET_ALL)) {
		pthread_mutex_unlock(&e->lock);
		memset(slots, 0, sizeof(*slots) * n);
		return (int)left;
	}
	scale = decay_scale(e);
	for (size_t i = 0; i < n; i++)
		if (slots[i])
			access_hit(e, refs[i].file, refs[i].chunk, slots[i], stream, scale, now);
	pthread_mutex_unlock(&e->lock);
	return (int)left;
}

/* Drop one pin of a resident slot. e->lock held. */
static void slot_release(ckv_engine *e, ckv_slot *s)
{
	assert(s->pins > 0 && s->state == SLOT_READY);
	if (--s->pins == 0) {
		if (s->detached) {
			slot_free(e, s);
		} else {
			e->st.pinned--;
			if (s->f->stale) {
				if (s->heap != HEAP_NONE)
					heap_remove(e, s);
				e->st.evictions++;
				slot_free(e, s);
			} else if (s->heap == HEAP_NONE) {
				heap_insert(e, s);
			} /* else still in its heap, marked since the pin */
		}
	}
}

void ckv_engine_release(ckv_engine *e, ckv_slot *s)
{
	if (!s)
		return;
	pthread_mutex_lock(&e->lock);
	slot_release(e, s);
	pthread_mutex_unlock(&e->lock);
}

void ckv_engine_release_n(ckv_engine *e, ckv_slot *const *s, size_t n)
{
	if (!e || n == 0)
		return;
	pthread_mutex_lock(&e->lock);
	for (size_t i = 0; i < n; i++)
		if (s[i])
			slot_release(e, s[i]);
	pthread_mutex_unlock(&e->lock);
}

int ckv_engine_prefetch(ckv_engine *e, const ckv_chunk_ref *refs, size_t n)
{
	bool wake = false;
	double scale;

	if (!e || (n && !refs))
		return -EINVAL;
	pthread_mutex_lock(&e->lock);
	e->st.hints++;
	scale = decay_scale(e);
	for (size_t i = 0; i < n; i++) {
		ckv_efile *f = refs[i].file;
		uint32_t c = refs[i].chunk;
		ckv_slot *s;

		if (!f || c >= f->nchunks || f->ent[c])
			continue;
		s = slot_alloc(e, f->stride, false);
		if (!s)
			break; /* arena full of pins: a hint, not an error */
		/* The access the hint announces is counted now, not at the get. */
		note_access(f, c, scale, true, (int64_t)time(NULL));
		s->f = f;
		s->chunk = c;
		s->len = f->chunk_bytes;
		s->state = SLOT_READING;
		s->prefetched = true;
		s->seq = ++e->seq;
		f->ent[c] = s;
		f->nslots++;
		f->nreading++;
		s->queue = Q_BG;
		q_push(&e->qbg, s, false);
		e->st.readahead_issued++;
		wake = true;
	}
	pthread_mutex_unlock(&e->lock);
	if (wake)
		kick(e);
	return 0;
}

int ckv_engine_score(ckv_engine *e, const ckv_chunk_ref *refs, const float *scores, size_t n)
{
	double scale;
	int rc = 0;

	if (!e || (n && (!refs || !scores)))
		return -EINVAL;
	for (size_t i = 0; i < n; i++)
		if (!refs[i].file || refs[i].chunk >= refs[i].file->nchunks || !isfinite(scores[i]))
			return -EINVAL;
	pthread_mutex_lock(&e->lock);
	e->st.hints++;
	scale = decay_scale(e);
	for (size_t i = 0; i < n; i++) {
		ckv_efile *f = refs[i].file;
		uint32_t c = refs[i].chunk;
		struct rstat *r = rstat_get(f->rk, c, true);

		if (!r) {
			rc = -ENOMEM;
			break;
		}
		r->i_hat += (double)scores[i] * scale;
		r->last = (int64_t)time(NULL);
		if (f->ent[c])
			slot_rekey(e, f->ent[c]);
	}
	pthread_mutex_unlock(&e->lock);
	return rc;
}

bool ckv_engine_resident(ckv_engine *e, const ckv_chunk_ref *ref)
{
	bool res;

	if (!e || !ref || !ref->file || ref->chunk >= ref->file->nchunks)
		return false;
	pthread_mutex_lock(&e->lock);
	res = ref->file->ent[ref->chunk] && ref->file->ent[ref->chunk]->state == SLOT_READY;
	pthread_mutex_unlock(&e->lock);
	return res;
}

void ckv_engine_resident_n(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, uint8_t *out)
{
	if (!e || (n && (!refs || !out)))
		return;
	pthread_mutex_lock(&e->lock);
	for (size_t i = 0; i < n; i++) {
		const ckv_efile *f = refs[i].file;

		out[i] = f && refs[i].chunk < f->nchunks && f->ent[refs[i].chunk] &&
			 f->ent[refs[i].chunk]->state == SLOT_READY;
	}
	pthread_mutex_unlock(&e->lock);
}

/*
 * Withdraw request idx[k] of the idle get (cb, arg) for refs[k] while its
 * chunk still waits in the idle queue: its waiter completes with
 * -ECANCELED (delivered by the I/O thread like any completion), its pin
 * goes, and a slot nobody else waits for is freed unread.
 */
int ckv_engine_cancel(ckv_engine *e, const ckv_chunk_ref *refs, const size_t *idx, size_t n,
		      ckv_get_cb cb, void *arg, uint8_t *done)
{
	bool wake = false;

	if (!e || !cb || (n && (!refs || !idx || !done)))
		return -EINVAL;
	pthread_mutex_lock(&e->lock);
	for (size_t k = 0; k < n; k++) {
		ckv_efile *f = refs[k].file;
		uint32_t c = refs[k].chunk;
		struct waiter **pw, *w = NULL;
		ckv_slot *s;

		done[k] = 0;
		if (!f || c >= f->nchunks)
			continue;
		s = f->ent[c];
		if (!s || s->state != SLOT_READING || s->queue != Q_IDLE)
			continue;
		for (pw = &s->waiters; *pw; pw = &(*pw)->next)
			if ((*pw)->req->cb == cb && (*pw)->req->arg == arg && (*pw)->i == idx[k]) {
				w = *pw;
				*pw = w->next;
				break;
			}
		if (!w)
			continue;
		/* while a slot is read, each of its pins belongs to one waiter */
		assert(s->pins > 0);
		if (--s->pins == 0 && !s->detached)
			e->st.pinned--;
		waiter_done(e, w, NULL, -ECANCELED);
		wake = true;
		done[k] = 1;
		if (!s->waiters) {
			assert(s->pins == 0);
			q_remove(&e->qidle, s);
			s->queue = Q_NONE;
			f->nreading--;
			slot_free(e, s);
		}
	}
	pthread_mutex_unlock(&e->lock);
	if (wake)
		kick(e);
	return 0;
}

void ckv_engine_get_stats(ckv_engine *e, ckv_engine_stats *st)
{
	pthread_mutex_lock(&e->lock);
	*st = e->st;
	pthread_mutex_unlock(&e->lock);
	st->arena_bytes = e->arena_size;
}

/* ---- retention persistence ---------------------------------------------- */

struct rsnap {
	const char *key;
	uint32_t chunk;
	double importance, freq;
	int64_t last;
};

/*
 * Values are decayed to the moment of the call; `last` is unix seconds.
 * The callback runs without the engine lock (key strings live until close).
 */
int ckv_engine_retention_each(ckv_engine *e, ckv_retention_fn fn, void *arg)
{
	struct rsnap *v = NULL;
	size_t n = 0, cap = 0;
	double inv;
	int rc = 0;

	if (!e || !fn)
		return -EINVAL;
	pthread_mutex_lock(&e->lock);
	inv = 1.0 / decay_scale(e);
	for (size_t b = 0; b < e->rk_nb && rc == 0; b++)
		for (struct rkey *rk = e->rk_tab[b]; rk && rc == 0; rk = rk->next)
			for (uint32_t c = 0; c < rk->cap; c++) {
				const struct rstat *r = &rk->st[c];

				if (!r->last && !r->i_hat && !r->f_hat)
					continue;
				if (n == cap) {
					size_t nc = cap ? cap * 2 : 256;
					struct rsnap *nv = realloc(v, nc * sizeof(*nv));

					if (!nv) {
						rc = -ENOMEM;
						break;
					}
					v = nv;
					cap = nc;
				}
				v[n++] = (struct rsnap){ rk->key, c, r->i_hat * inv, r->f_hat * inv,
							 r->last };
			}
	pthread_mutex_unlock(&e->lock);
	for (size_t i = 0; i < n && rc == 0; i++)
		rc = fn(arg, v[i].key, v[i].chunk, v[i].importance, v[i].freq, v[i].last);
	free(v);
	return rc;
}

/*
 * Set the record of (key, chunk) to values taken as current now: time the
 * daemon was down does not decay them.
 */
int ckv_engine_retention_load(ckv_engine *e, const char *key, uint32_t chunk, double importance,
			      double freq, int64_t last)
{
	struct rkey *rk;
	struct rstat *r;
	double scale;
	int rc = 0;

	if (!e || !key || chunk >= CKV_MAX_LOAD_CHUNK || !isfinite(importance) ||
	    !isfinite(freq) || freq < 0)
		return -EINVAL;
	pthread_mutex_lock(&e->lock);
	scale = decay_scale(e);
	rk = rkey_find(e, key, true);
	r = rk ? rstat_get(rk, chunk, true) : NULL;
	if (!r) {
		rc = -ENOMEM;
		goto out_unlock;
	}
	r->i_hat = importance * scale;
	r->f_hat = freq * scale;
	r->last = last;
	if (rk->live && chunk < rk->live->nchunks && rk->live->ent[chunk])
		slot_rekey(e, rk->live->ent[chunk]);
out_unlock:
	pthread_mutex_unlock(&e->lock);
	return rc;
}
