/*
 * gpu_tier.c — the loader's GPU-resident chunk cache (DESIGN §6): chunks
 * that stay hot across requests are kept in backend memory (device memory
 * for CUDA, host memory for the host backend, with identical logic) and
 * copied device to device instead of being fetched from the arena.
 *
 * Memory: one backend allocation of the budget, made at the first insert
 * and cut into slots of that chunk's size (chunk_bytes, a multiple of 4096);
 * a later chunk larger than a slot is not cached. Entries are found by the
 * physical chunk's key (ckv_tkey) in a chained hash table of entry indices.
 *
 * Policy, the engine's (ckvfs/engine.c): per entry I (attention feedback)
 * and F (accesses), decayed with a half-life, kept normalised to an epoch
 * (v_hat = v(t) * 2^((t - epoch) / h)) so decay never reorders them;
 *   S = (I + EPS * F) * F
 * and an insert into a full tier evicts the lowest S (ties: least recently
 * used) among entries that are resident and unpinned. S is homogeneous of
 * degree two, so moving the epoch rescales every key alike and the heap
 * stays valid, unless the rescale underflows values to zero (a tier idle
 * for ~1000 half-lives): then the heap is rebuilt.
 *
 * Entry states: FREE, FILLING (reserved, its copy enqueued but maybe not
 * executed: invisible to lookups, pinned), READY. Pins: one per pending
 * copy out of the entry; a pinned entry is never evicted.
 *
 * Locking: t->lock protects everything but the immutable be and budget.
 * Callers may call in from backend->after threads (filled, unpin).
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "loader_int.h"

#define TIER_EPS 1e-3
#define TIER_REBASE 0x1p64
#define NIL UINT32_MAX

enum { T_FREE = 0, T_FILLING, T_READY };

struct tent {
	ckv_tkey key;
	uint8_t state;
	uint32_t pins;
	uint32_t hnext;    /* hash chain */
	uint32_t hpos;     /* index in the heap, NIL when not there */
	double i_hat, f_hat;
	uint64_t seq;      /* recency, for ties */
};

struct ckv_tier {
	ckv_backend *be;   /* immutable */
	uint64_t budget;   /* immutable */
	double halflife;   /* immutable */
	pthread_mutex_t lock;
	/* everything below: t->lock */
	uint64_t stride;   /* slot size; 0 until the first insert */
	uint32_t nslots;
	uint8_t *mem;      /* nslots * stride of backend memory */
	struct tent *ents; /* [nslots] */
	uint32_t *bucket;  /* [nbuckets] first entry of each chain */
	uint32_t nbuckets; /* power of two */
	uint32_t *heap;    /* evictable entries (READY, unpinned), min S first */
	uint32_t nheap;
	uint32_t *freel;   /* free entries */
	uint32_t nfree;
	double epoch;      /* monotonic seconds */
	uint64_t seq;
	uint64_t used, evictions;
	bool disabled;     /* the allocation failed or the budget holds no chunk */
};

static double mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t khash(const ckv_tkey *k, uint32_t nb)
{
	uint64_t x = k->a * 0x9e3779b97f4a7c15ull ^ (k->b + 0x632be59bd9b4e019ull) * 0xbf58476d1ce4e5b9ull;

	x ^= x >> 31;
	return (uint32_t)x & (nb - 1);
}

static double score(const struct tent *e)
{
	return (e->i_hat + TIER_EPS * e->f_hat) * e->f_hat;
}

static bool below(const struct ckv_tier *t, uint32_t a, uint32_t b)
{
	double sa = score(&t->ents[a]), sb = score(&t->ents[b]);

	return sa < sb || (sa == sb && t->ents[a].seq < t->ents[b].seq);
}

static void hset(struct ckv_tier *t, uint32_t pos, uint32_t id)
{
	t->heap[pos] = id;
	t->ents[id].hpos = pos;
}

static void heap_up(struct ckv_tier *t, uint32_t pos)
{
	uint32_t id = t->heap[pos];

	while (pos > 0) {
		uint32_t parent = (pos - 1) / 2;

		if (!below(t, id, t->heap[parent]))
			break;
		hset(t, pos, t->heap[parent]);
		pos = parent;
	}
	hset(t, pos, id);
}

static void heap_down(struct ckv_tier *t, uint32_t pos)
{
	uint32_t id = t->heap[pos];

	for (;;) {
		uint32_t l = 2 * pos + 1, r = l + 1, w = l;

		if (l >= t->nheap)
			break;
		if (r < t->nheap && below(t, t->heap[r], t->heap[l]))
			w = r;
		if (!below(t, t->heap[w], id))
			break;
		hset(t, pos, t->heap[w]);
		pos = w;
	}
	hset(t, pos, id);
}

static void heap_push(struct ckv_tier *t, uint32_t id)
{
	hset(t, t->nheap++, id);
	heap_up(t, t->nheap - 1);
}

static void heap_del(struct ckv_tier *t, uint32_t id)
{
	uint32_t pos = t->ents[id].hpos, last;

	if (pos == NIL)
		return;
	t->ents[id].hpos = NIL;
	last = t->heap[--t->nheap];
	if (pos == t->nheap)
		return;
	hset(t, pos, last);
	heap_up(t, pos);
	heap_down(t, t->ents[last].hpos);
}

static void heap_fix(struct ckv_tier *t, uint32_t id)
{
	uint32_t pos = t->ents[id].hpos;

	if (pos == NIL)
		return;
	heap_up(t, pos);
	heap_down(t, t->ents[id].hpos);
}

/* 2^((now - epoch) / h), moving the epoch forward when it grows too large. */
static double scale_now(struct ckv_tier *t)
{
	double now = mono(), x = exp2((now - t->epoch) / t->halflife);

	if (x > TIER_REBASE) {
		for (uint32_t i = 0; i < t->nslots; i++) {
			t->ents[i].i_hat /= x;
			t->ents[i].f_hat /= x;
		}
		t->epoch = now;
		x = 1;
		/*
		 * After a long idle stretch (over ~1000 half-lives x is infinite)
		 * values underflow to equal zeros, which order by recency, not
		 * as the heap was built: rebuild it.
		 */
		for (uint32_t pos = t->nheap / 2; pos-- > 0;)
			heap_down(t, pos);
	}
	return x;
}

static uint32_t find(const struct ckv_tier *t, const ckv_tkey *k)
{
	if (!t->nbuckets)
		return NIL;
	for (uint32_t id = t->bucket[khash(k, t->nbuckets)]; id != NIL; id = t->ents[id].hnext)
		if (t->ents[id].key.a == k->a && t->ents[id].key.b == k->b)
			return id;
	return NIL;
}

static void unlink_hash(struct ckv_tier *t, uint32_t id)
{
	uint32_t *pp = &t->bucket[khash(&t->ents[id].key, t->nbuckets)];

	while (*pp != NIL && *pp != id)
		pp = &t->ents[*pp].hnext;
	if (*pp == id)
		*pp = t->ents[id].hnext;
	t->ents[id].hnext = NIL;
}

static void entry_free(struct ckv_tier *t, uint32_t id)
{
	unlink_hash(t, id);
	heap_del(t, id);
	t->ents[id].state = T_FREE;
	t->ents[id].pins = 0;
	t->freel[t->nfree++] = id;
	t->used -= t->stride;
}

int ckv_tier_create(ckv_backend *be, uint64_t budget, double halflife_s, ckv_tier **out)
{
	struct ckv_tier *t = calloc(1, sizeof(*t));

	if (!t)
		return -ENOMEM;
	t->be = be;
	t->budget = budget;
	t->halflife = halflife_s > 0 ? halflife_s : 600.0;
	t->epoch = mono();
	pthread_mutex_init(&t->lock, NULL);
	*out = t;
	return 0;
}

void ckv_tier_destroy(ckv_tier *t)
{
	if (!t)
		return;
	if (t->mem)
		t->be->ops->free(t->be, t->mem);
	free(t->ents);
	free(t->bucket);
	free(t->heap);
	free(t->freel);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

/* First insert: size the slots after this chunk and allocate. t->lock held. */
static int tier_setup(struct ckv_tier *t, uint64_t chunk_bytes)
{
	uint64_t n = t->budget / chunk_bytes;
	uint32_t nb = 1;
	void *mem = NULL;
	int rc;

	if (n == 0)
		return -ENOSPC;
	if (n > (1u << 30))
		n = 1u << 30;
	while (nb < 2 * n)
		nb <<= 1;
	t->ents = calloc(n, sizeof(*t->ents));
	t->bucket = malloc(sizeof(*t->bucket) * nb);
	t->heap = malloc(sizeof(*t->heap) * n);
	t->freel = malloc(sizeof(*t->freel) * n);
	rc = t->ents && t->bucket && t->heap && t->freel ? 0 : -ENOMEM;
	if (rc == 0)
		rc = t->be->ops->alloc(t->be, n * chunk_bytes, &mem);
	if (rc < 0) {
		free(t->ents);
		free(t->bucket);
		free(t->heap);
		free(t->freel);
		t->ents = NULL;
		t->bucket = t->heap = t->freel = NULL;
		return rc;
	}
	for (uint32_t i = 0; i < nb; i++)
		t->bucket[i] = NIL;
	for (uint32_t i = 0; i < n; i++) {
		t->ents[i].hnext = NIL;
		t->ents[i].hpos = NIL;
		t->freel[i] = (uint32_t)(n - 1 - i);
	}
	t->mem = mem;
	t->nslots = (uint32_t)n;
	t->nfree = (uint32_t)n;
	t->nbuckets = nb;
	t->stride = chunk_bytes;
	return 0;
}

uint32_t ckv_tier_lookup(ckv_tier *t, const ckv_tkey *k, uint64_t chunk_bytes, void **ptr)
{
	uint32_t id;

	pthread_mutex_lock(&t->lock);
	id = t->stride && chunk_bytes <= t->stride ? find(t, k) : NIL;
	if (id != NIL && t->ents[id].state == T_READY) {
		struct tent *e = &t->ents[id];

		if (e->pins++ == 0)
			heap_del(t, id);
		e->f_hat += scale_now(t);
		e->seq = ++t->seq;
		*ptr = t->mem + (size_t)id * t->stride;
	} else {
		id = NIL;
	}
	pthread_mutex_unlock(&t->lock);
	return id;
}

uint32_t ckv_tier_reserve(ckv_tier *t, const ckv_tkey *k, uint64_t chunk_bytes, void **ptr)
{
	uint32_t id = NIL;
	struct tent *e;

	pthread_mutex_lock(&t->lock);
	if (t->disabled)
		goto out_unlock;
	if (!t->stride && tier_setup(t, chunk_bytes) < 0) {
		t->disabled = true;
		goto out_unlock;
	}
	if (chunk_bytes > t->stride || find(t, k) != NIL)
		goto out_unlock;
	if (t->nfree) {
		id = t->freel[--t->nfree];
	} else if (t->nheap) {
		id = t->heap[0];
		entry_free(t, id);
		t->evictions++;
		id = t->freel[--t->nfree];
	} else {
		goto out_unlock; /* everything pinned */
	}
	e = &t->ents[id];
	e->key = *k;
	e->state = T_FILLING;
	e->pins = 1;
	e->i_hat = 0;
	e->f_hat = scale_now(t); /* the access that brought it */
	e->seq = ++t->seq;
	e->hpos = NIL;
	{
		uint32_t b = khash(k, t->nbuckets);

		e->hnext = t->bucket[b];
		t->bucket[b] = id;
	}
	t->used += t->stride;
	*ptr = t->mem + (size_t)id * t->stride;
out_unlock:
	pthread_mutex_unlock(&t->lock);
	return id;
}

void ckv_tier_filled(ckv_tier *t, uint32_t id)
{
	pthread_mutex_lock(&t->lock);
	if (id < t->nslots && t->ents[id].state == T_FILLING) {
		t->ents[id].state = T_READY;
		if (--t->ents[id].pins == 0)
			heap_push(t, id);
	}
	pthread_mutex_unlock(&t->lock);
}

void ckv_tier_unpin(ckv_tier *t, uint32_t id)
{
	pthread_mutex_lock(&t->lock);
	if (id < t->nslots && t->ents[id].pins > 0 && --t->ents[id].pins == 0 &&
	    t->ents[id].state == T_READY)
		heap_push(t, id);
	pthread_mutex_unlock(&t->lock);
}

void ckv_tier_abort(ckv_tier *t, uint32_t id)
{
	pthread_mutex_lock(&t->lock);
	if (id < t->nslots && t->ents[id].state == T_FILLING)
		entry_free(t, id);
	pthread_mutex_unlock(&t->lock);
}

void ckv_tier_score(ckv_tier *t, const ckv_tkey *k, const float *scores, uint32_t n)
{
	double sc;

	pthread_mutex_lock(&t->lock);
	if (!t->stride)
		goto out_unlock;
	sc = scale_now(t);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t id = find(t, &k[i]);

		if (id == NIL || !isfinite(scores[i]))
			continue;
		t->ents[id].i_hat += (double)scores[i] * sc;
		if (t->ents[id].i_hat < 0)
			t->ents[id].i_hat = 0;
		heap_fix(t, id);
	}
out_unlock:
	pthread_mutex_unlock(&t->lock);
}

void ckv_tier_usage(ckv_tier *t, uint64_t *budget, uint64_t *used, uint64_t *evictions)
{
	pthread_mutex_lock(&t->lock);
	*budget = t->budget;
	*used = t->used;
	*evictions = t->evictions;
	pthread_mutex_unlock(&t->lock);
}
