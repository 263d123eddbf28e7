/*
 * source_embedded.c — the embedded chunk source (gpu/source.h): the store,
 * a chunk engine and prefix views in this process. No daemon, no FUSE.
 *
 * A prefix opened here is a ckv_pview plus, per layer and part, the engine
 * files of its extents (registered on first use, held until the prefix is
 * closed). Retention keys are the pview's ("<segment>/<layer>[/k|/v]"), so a
 * chunk shared by a parent prefix and its extension is one chunk in the
 * arena.
 *
 * Key digests (digest.bin of each extent's segment) are read through the
 * page cache (warm requests find them there) without the kernel's
 * read-ahead (POSIX_FADV_RANDOM: it read megabytes past the layer asked
 * for); digests_hint starts the reads of exactly a layer's regions
 * (POSIX_FADV_WILLNEED) for a later digests call. Each prefix keeps its
 * digest files open, headers checked, after the first use.
 *
 * Locking: es->lock protects the prefix table (es->pfx, es->npfx); each
 * prefix's lock protects its lazily filled file table and digest files.
 * Lock order: es->lock before a prefix's lock; neither is held while
 * calling into the engine with a callback that could come back here
 * (completion callbacks only touch their own struct getctx; gets ask for
 * CKV_GET_INLINE, so a hit's callback runs inside the get, still without
 * these locks).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_engine.h"
#include "ckv_pview.h"
#include "ckv_store.h"
#include "source.h"

/* An extent's digest.bin, opened on first use. */
struct dfile {
	int fd;                    /* -1: not open yet */
	uint32_t chunks;           /* the segment's chunks (from the header) */
};

struct eprefix {
	ckv_pview *v;              /* one reference */
	pthread_mutex_t lock;      /* protects files, have, dig */
	ckv_efile **files;         /* [3 parts][layers][nextents], lazily filled */
	uint8_t *have;             /* [3][layers]: files of that layer and part held */
	struct dfile *dig;         /* [nextents] */
	uint32_t layers, nextents;
};

struct esource {
	struct ckv_source base;    /* first: a ckv_source * is a struct esource * */
	ckv_store *store;
	ckv_engine *engine;
	pthread_mutex_t lock;      /* protects pfx, npfx */
	struct eprefix **pfx;      /* [npfx], NULL where free; pid = index + 1 */
	uint32_t npfx;
};

/*
 * The disk reads of a get: maps the engine's completions onto the
 * source's. The get's arena hits never come here (es_get_ex delivers them
 * itself); orig[i] is the source index of the engine request's index i.
 */
struct getctx {
	ckv_source_cb cb;
	void *arg;
	atomic_size_t left;       /* completions still to come; the last frees */
	uint32_t n;               /* requests sent to the engine */
	uint32_t orig[];          /* [n], ascending */
};

static struct esource *es_of(ckv_source *s)
{
	return (struct esource *)s;
}

/* Look up pid; the returned prefix stays valid until close(pid), which the
 * caller does not race with (a prefix is used from one thread at a time). */
static struct eprefix *pfx_get(struct esource *es, uint32_t pid)
{
	struct eprefix *ep = NULL;

	pthread_mutex_lock(&es->lock);
	if (pid >= 1 && pid <= es->npfx)
		ep = es->pfx[pid - 1];
	pthread_mutex_unlock(&es->lock);
	return ep;
}

/* The engine files of (layer, part), registering them on first use. */
static int pfx_files(struct eprefix *ep, uint32_t layer, enum ckv_source_part part,
		     ckv_efile ***out)
{
	size_t slot = (size_t)part * ep->layers + layer;
	int rc = 0;

	if (layer >= ep->layers || part > CKV_SRC_V)
		return -EINVAL;
	pthread_mutex_lock(&ep->lock);
	if (!ep->have[slot]) {
		rc = ckv_pview_files_get(ep->v, layer, (enum ckv_pview_part)part,
					 ep->files + slot * ep->nextents);
		if (rc == 0)
			ep->have[slot] = 1;
	}
	pthread_mutex_unlock(&ep->lock);
	if (rc == 0)
		*out = ep->files + slot * ep->nextents;
	return rc;
}

/*
 * refs for chunks[0..n) of a layer and part: into stack when it holds n
 * (nstack entries), else malloc'ed (free *refs when it is not stack).
 */
static int pfx_refs(struct esource *es, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		    const uint32_t *chunks, uint32_t n, ckv_chunk_ref *stack, uint32_t nstack,
		    ckv_chunk_ref **refs)
{
	struct eprefix *ep = pfx_get(es, pid);
	const ckv_manifest *m;
	ckv_efile **files = NULL;
	ckv_chunk_ref *r;
	int rc;

	if (!ep) {
		snprintf(es->base.err, sizeof(es->base.err), "no open prefix with id %u", pid);
		return -EBADF;
	}
	m = ckv_pview_manifest(ep->v);
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= m->chunks) {
			snprintf(es->base.err, sizeof(es->base.err),
				 "chunk %u: the prefix has %u chunks", chunks[i], m->chunks);
			return -EINVAL;
		}
	rc = pfx_files(ep, layer, part, &files);
	if (rc < 0) {
		snprintf(es->base.err, sizeof(es->base.err),
			 "layer %u: cannot register its chunk files: %s", layer, strerror(-rc));
		return rc;
	}
	r = n && n <= nstack ? stack : malloc(sizeof(*r) * (n ? n : 1));
	if (!r)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++)
		r[i] = ckv_pview_ref(ep->v, files, chunks[i]);
	*refs = r;
	return 0;
}

static int es_match(ckv_source *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		    ckv_hash *h, uint32_t *matched)
{
	uint32_t lookups = 0;

	return ckv_store_match(es_of(s)->store, g, tokens, n, h, matched, &lookups);
}

static void eprefix_free(struct esource *es, struct eprefix *ep)
{
	if (!ep)
		return;
	if (ep->files && ep->have)
		for (size_t slot = 0; slot < (size_t)3 * ep->layers; slot++)
			if (ep->have[slot])
				ckv_pview_files_put(ep->v, ep->files + slot * ep->nextents);
	(void)es;
	for (uint32_t x = 0; ep->dig && x < ep->nextents; x++)
		if (ep->dig[x].fd >= 0)
			close(ep->dig[x].fd);
	free(ep->dig);
	free(ep->files);
	free(ep->have);
	pthread_mutex_destroy(&ep->lock);
	ckv_pview_put(ep->v);
	free(ep);
}

/* A deep copy of a store record. */
static int manifest_dup(const ckv_manifest *src, ckv_manifest **out)
{
	ckv_manifest *m = malloc(sizeof(*m));

	if (!m)
		return -ENOMEM;
	*m = *src;
	m->extents = NULL;
	m->t_layers = NULL;
	if (src->nextents) {
		m->extents = malloc(sizeof(*m->extents) * src->nextents);
		if (!m->extents)
			goto out_nomem;
		memcpy(m->extents, src->extents, sizeof(*m->extents) * src->nextents);
	}
	if (src->t_layers && src->geom.layers) {
		m->t_layers = malloc(sizeof(*m->t_layers) * src->geom.layers);
		if (!m->t_layers)
			goto out_nomem;
		memcpy(m->t_layers, src->t_layers, sizeof(*m->t_layers) * src->geom.layers);
	}
	*out = m;
	return 0;

out_nomem:
	ckv_manifest_free(m);
	free(m);
	return -ENOMEM;
}

static int es_open(ckv_source *s, const ckv_hash *h, ckv_manifest **mout, uint32_t *pid)
{
	struct esource *es = es_of(s);
	struct eprefix *ep;
	const ckv_manifest *m;
	ckv_err err = { { 0 } };
	uint32_t slot;
	int rc;

	ep = calloc(1, sizeof(*ep));
	if (!ep)
		return -ENOMEM;
	pthread_mutex_init(&ep->lock, NULL);
	rc = ckv_pview_open(es->store, es->engine, h, &ep->v, &err);
	if (rc < 0) {
		char hex[CKV_HASH_HEX + 1];

		ckv_hash_hex(h, hex);
		if (rc == -ENOENT)
			snprintf(s->err, sizeof(s->err), "prefix %s: not stored", hex);
		else
			snprintf(s->err, sizeof(s->err), "prefix %s: %.400s", hex,
				 err.msg[0] ? err.msg : strerror(-rc));
		pthread_mutex_destroy(&ep->lock);
		free(ep);
		return rc;
	}
	m = ckv_pview_manifest(ep->v);
	ep->layers = m->geom.layers;
	ep->nextents = m->nextents;
	ep->files = calloc((size_t)3 * ep->layers * ep->nextents, sizeof(*ep->files));
	ep->have = calloc((size_t)3 * ep->layers, 1);
	ep->dig = calloc(ep->nextents ? ep->nextents : 1, sizeof(*ep->dig));
	for (uint32_t x = 0; ep->dig && x < ep->nextents; x++)
		ep->dig[x].fd = -1;
	if (!ep->files || !ep->have || !ep->dig) {
		rc = -ENOMEM;
		goto out_free;
	}
	rc = manifest_dup(m, mout);
	if (rc < 0)
		goto out_free;

	pthread_mutex_lock(&es->lock);
	for (slot = 0; slot < es->npfx && es->pfx[slot]; slot++)
		;
	if (slot == es->npfx) {
		uint32_t ncap = es->npfx ? es->npfx * 2 : 8;
		struct eprefix **np = realloc(es->pfx, sizeof(*np) * ncap);

		if (!np) {
			pthread_mutex_unlock(&es->lock);
			ckv_manifest_free(*mout);
			free(*mout);
			*mout = NULL;
			rc = -ENOMEM;
			goto out_free;
		}
		memset(np + es->npfx, 0, sizeof(*np) * (ncap - es->npfx));
		es->pfx = np;
		es->npfx = ncap;
	}
	es->pfx[slot] = ep;
	pthread_mutex_unlock(&es->lock);
	*pid = slot + 1;
	return 0;

out_free:
	eprefix_free(es, ep);
	return rc;
}

static void es_close(ckv_source *s, uint32_t pid)
{
	struct esource *es = es_of(s);
	struct eprefix *ep = NULL;

	pthread_mutex_lock(&es->lock);
	if (pid >= 1 && pid <= es->npfx) {
		ep = es->pfx[pid - 1];
		es->pfx[pid - 1] = NULL;
	}
	pthread_mutex_unlock(&es->lock);
	eprefix_free(es, ep);
}

/* (offset, length, token) of a pinned slot as the source reports them. */
static int slot_out(const ckv_slot *slot, uint64_t *off, uint64_t *len)
{
	*off = ckv_slot_offset(slot);
	*len = ckv_slot_len(slot);
	if (*off == CKV_SLOT_DETACHED) { /* only streaming gets detach; never ours */
		*off = *len = 0;
		return -EIO;
	}
	return 0;
}

/* Engine completion of a read: forward as (offset, length, token = the slot). */
static void es_get_cb(void *arg, size_t i, ckv_slot *slot, int rc)
{
	struct getctx *g = arg;
	uint64_t off = 0, len = 0;

	if (rc == 0 && slot)
		rc = slot_out(slot, &off, &len);
	else if (rc == 0)
		rc = -EIO;
	g->cb(g->arg, g->orig[i], off, len, (uint64_t)(uintptr_t)slot, rc);
	if (atomic_fetch_sub(&g->left, 1) == 1)
		free(g);
}

/*
 * A set's chunk refs and engine slots for one get_ready pass: on the stack
 * up to SET_STACK chunks, else malloc'ed. set_free after set_get, whatever
 * it returned.
 */
enum { SET_STACK = 256 };
struct eset {
	ckv_chunk_ref rstack[SET_STACK];
	ckv_slot *sstack[SET_STACK];
	ckv_chunk_ref *refs;
	ckv_slot **slots;
};

static int set_get(struct esource *es, struct eset *set, uint32_t pid, uint32_t layer,
		   enum ckv_source_part part, const uint32_t *chunks, uint32_t n)
{
	int rc = pfx_refs(es, pid, layer, part, chunks, n, set->rstack, SET_STACK, &set->refs);

	set->slots = set->sstack;
	if (rc < 0) {
		set->refs = set->rstack; /* nothing to free */
		return rc;
	}
	if (n > SET_STACK && !(set->slots = malloc(sizeof(*set->slots) * n)))
		return -ENOMEM;
	return 0;
}

static void set_free(struct eset *set)
{
	if (set->slots != set->sstack)
		free(set->slots);
	if (set->refs != set->rstack)
		free(set->refs);
}

/*
 * Arena hits are pinned in one engine pass (ckv_engine_get_ready) and
 * delivered here, on the calling thread; only the rest go to the engine as
 * an asynchronous get. The hits are delivered after that get is issued, so
 * a failed get has made no callback, and before returning, so the handle
 * (NULL when every chunk was a hit) names a get whose callbacks are all
 * reads.
 */
static int es_get_ex(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		     const uint32_t *chunks, uint32_t n, unsigned flags, ckv_source_cb cb, void *arg,
		     uint8_t *resident, void **handle)
{
	struct esource *es = es_of(s);
	struct eset set;
	ckv_chunk_ref *refs;
	ckv_slot **slots;
	struct getctx *g = NULL;
	uint32_t nmiss;
	int rc;

	if (handle)
		*handle = NULL;
	if (n == 0)
		return 0;
	rc = set_get(es, &set, pid, layer, part, chunks, n);
	refs = set.refs;
	slots = set.slots;
	if (rc == 0)
		rc = ckv_engine_get_ready(es->engine, refs, n, 0, slots);
	if (rc < 0)
		goto out;
	nmiss = (uint32_t)rc;
	rc = 0;
	if (nmiss) {
		g = malloc(sizeof(*g) + sizeof(g->orig[0]) * nmiss);
		if (!g) {
			ckv_engine_release_n(es->engine, slots, n);
			rc = -ENOMEM;
			goto out;
		}
		g->cb = cb;
		g->arg = arg;
		g->n = nmiss;
		atomic_init(&g->left, nmiss);
		for (uint32_t i = 0, k = 0; i < n; i++)
			if (!slots[i]) {
				g->orig[k] = i;
				refs[k++] = refs[i];
			}
		if (handle)
			*handle = g; /* before the get: its callbacks may free g */
		rc = ckv_engine_get_async(es->engine, refs, nmiss,
					  CKV_GET_INLINE |
						  (flags & CKV_SRC_GET_IDLE ? CKV_GET_IDLE : CKV_GET_DEMAND),
					  es_get_cb, g);
		if (rc < 0) {
			free(g);
			if (handle)
				*handle = NULL;
			ckv_engine_release_n(es->engine, slots, n);
			snprintf(s->err, sizeof(s->err), "layer %u: engine get: %s", layer, strerror(-rc));
			goto out;
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		uint64_t off, len;

		if (resident)
			resident[i] = slots[i] != NULL;
		if (slots[i]) {
			int r = slot_out(slots[i], &off, &len);

			cb(arg, i, off, len, (uint64_t)(uintptr_t)slots[i], r);
		}
	}
out:
	set_free(&set);
	return rc;
}

/*
 * The warm path of a fetch (source.h): the set's refs on the stack, one
 * all-or-nothing engine pass, the slots' places copied out; no get, no
 * callback.
 */
static int es_pin_resident(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
			   const uint32_t *chunks, uint32_t n, uint64_t *off, uint64_t *len,
			   uint64_t *tok)
{
	struct esource *es = es_of(s);
	struct eset set;
	int rc;

	if (n == 0)
		return 0;
	rc = set_get(es, &set, pid, layer, part, chunks, n);
	if (rc == 0)
		rc = ckv_engine_get_ready(es->engine, set.refs, n, CKV_GET_ALL, set.slots);
	if (rc > 0)
		rc = 1; /* not all resident: nothing pinned */
	for (uint32_t i = 0; rc == 0 && i < n; i++) {
		tok[i] = (uint64_t)(uintptr_t)set.slots[i];
		if (slot_out(set.slots[i], &off[i], &len[i]) < 0) {
			ckv_engine_release_n(es->engine, set.slots, n);
			rc = 1; /* a detached slot: the general path says what is wrong */
		}
	}
	set_free(&set);
	return rc;
}

static int es_get(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		  const uint32_t *chunks, uint32_t n, ckv_source_cb cb, void *arg)
{
	return es_get_ex(s, pid, layer, part, chunks, n, 0, cb, arg, NULL, NULL);
}

static int orig_cmp(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static int es_cancel(ckv_source *s, void *handle, uint32_t pid, uint32_t layer,
		     enum ckv_source_part part, const uint32_t *chunks, const uint32_t *idx,
		     uint32_t n, uint8_t *done)
{
	struct esource *es = es_of(s);
	struct getctx *g = handle;
	ckv_chunk_ref *refs = NULL;
	uint32_t *ch, *at, m = 0;
	uint8_t *sub_done;
	size_t *ix;
	int rc;

	memset(done, 0, n);
	if (n == 0 || !g)
		return 0;
	/* the engine knows the get by its own indices; hits were never its */
	ix = malloc((sizeof(*ix) + 2 * sizeof(*ch) + 1) * n);
	if (!ix)
		return -ENOMEM;
	ch = (uint32_t *)(ix + n);
	at = ch + n;
	sub_done = (uint8_t *)(at + n);
	for (uint32_t k = 0; k < n; k++) {
		const uint32_t *o = bsearch(&idx[k], g->orig, g->n, sizeof(*o), orig_cmp);

		if (!o)
			continue;
		ch[m] = chunks[k];
		at[m] = k;
		ix[m++] = (size_t)(o - g->orig);
	}
	rc = m ? pfx_refs(es, pid, layer, part, ch, m, NULL, 0, &refs) : 0;
	if (rc == 0 && m)
		rc = ckv_engine_cancel(es->engine, refs, ix, m, es_get_cb, handle, sub_done);
	for (uint32_t j = 0; rc == 0 && j < m; j++)
		done[at[j]] = sub_done[j];
	free(refs);
	free(ix);
	return rc;
}

static void es_release(ckv_source *s, const uint64_t *tokens, uint32_t n)
{
	struct esource *es = es_of(s);
	ckv_slot *v[64];

	/* tokens are the slots: release them in bunches under one engine lock */
	for (uint32_t i = 0; i < n;) {
		uint32_t k = 0;

		while (i < n && k < 64)
			v[k++] = (ckv_slot *)(uintptr_t)tokens[i++];
		ckv_engine_release_n(es->engine, v, k);
	}
}

static int es_prefetch(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		       const uint32_t *chunks, uint32_t n)
{
	struct esource *es = es_of(s);
	ckv_chunk_ref *refs = NULL;
	int rc;

	if (n == 0)
		return 0;
	rc = pfx_refs(es, pid, layer, part, chunks, n, NULL, 0, &refs);
	if (rc < 0)
		return rc;
	rc = ckv_engine_prefetch(es->engine, refs, n);
	free(refs);
	return rc;
}

/*
 * Feedback scores one physical chunk: the whole chunk's retention key (the
 * one KV reads use); the halves' keys get the same score so a RERANK
 * loader's K/V reads are retained alike.
 */
static int es_score(ckv_source *s, uint32_t pid, uint32_t layer, const uint32_t *chunks,
		    const float *scores, uint32_t n)
{
	struct esource *es = es_of(s);
	int rc = 0;

	if (n == 0)
		return 0;
	for (int part = CKV_SRC_KV; part <= CKV_SRC_V && rc == 0; part++) {
		ckv_chunk_ref *refs = NULL;

		rc = pfx_refs(es, pid, layer, (enum ckv_source_part)part, chunks, n, NULL, 0, &refs);
		if (rc < 0)
			break;
		rc = ckv_engine_score(es->engine, refs, scores, n);
		free(refs);
	}
	return rc;
}

/* Open extent x's digest.bin and check its header. ep->lock held. */
static int dig_open(struct eprefix *ep, uint32_t x, char *err, size_t errlen)
{
	const ckv_manifest *m = ckv_pview_manifest(ep->v);
	struct dfile *d = &ep->dig[x];
	char rel[PATH_MAX];
	ckv_side_header sh;
	int fd;

	if (d->fd >= 0)
		return 0;
	/* the pipeline says what it will read (digests_hint): no read-ahead past what is read */
	fd = ckv_pview_side_open(ep->v, x, "digest.bin", CKV_DIGEST_MAGIC, true, &sh, rel);
	if (fd >= 0 && sh.per_chunk != m->geom.kv_heads * m->geom.head_dim) {
		close(fd);
		fd = -EIO;
	}
	if (fd < 0) {
		snprintf(err, errlen, "%s: %s", rel,
			 fd == -EIO ? "not a digest file of this prefix's geometry" : strerror(-fd));
		return fd;
	}
	d->fd = fd;
	d->chunks = sh.chunks;
	return 0;
}

/* pread all of [off, off + len), or -errno (-EIO at end of file). */
static int pread_full(int fd, void *buf, uint64_t len, uint64_t off)
{
	uint64_t done = 0;

	while (done < len) {
		ssize_t got = pread(fd, (uint8_t *)buf + done, len - done, (off_t)(off + done));

		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return -errno;
		if (got == 0)
			return -EIO;
		done += (uint64_t)got;
	}
	return 0;
}

/*
 * For each extent of a layer: its digest file, the byte range of the layer
 * in it and where those bytes go in the prefix's digests (out: chunk
 * offset). fn returns 0 to go on.
 */
static int dig_each(struct esource *es, uint32_t pid, uint32_t layer, char *err, size_t errlen,
		    int (*fn)(void *arg, int fd, uint64_t off, uint64_t len, size_t first), void *arg)
{
	struct eprefix *ep = pfx_get(es, pid);
	const ckv_manifest *m;
	size_t per;
	int rc = 0;

	if (!ep) {
		snprintf(err, errlen, "no open prefix with id %u", pid);
		return -EBADF;
	}
	m = ckv_pview_manifest(ep->v);
	per = (size_t)m->geom.kv_heads * m->geom.head_dim;
	if (layer >= m->geom.layers) {
		snprintf(err, errlen, "layer %u: the prefix has %u layers", layer, m->geom.layers);
		return -EINVAL;
	}
	for (uint32_t x = 0; x < m->nextents && rc == 0; x++) {
		const ckv_extent *ex = &m->extents[x];
		uint64_t off;
		int fd;

		pthread_mutex_lock(&ep->lock);
		rc = dig_open(ep, x, err, errlen);
		fd = ep->dig[x].fd;
		off = CKV_SIDE_HEADER +
		      ((uint64_t)layer * ep->dig[x].chunks + ex->first) * per * sizeof(float);
		pthread_mutex_unlock(&ep->lock);
		if (rc == 0 && ex->count)
			rc = fn(arg, fd, off, sizeof(float) * per * ex->count,
				(size_t)ckv_pview_extent_start(ep->v, x) * per);
	}
	return rc;
}

static int dig_read_one(void *arg, int fd, uint64_t off, uint64_t len, size_t first)
{
	return pread_full(fd, (float *)arg + first, len, off);
}

static int dig_hint_one(void *arg, int fd, uint64_t off, uint64_t len, size_t first)
{
	(void)arg;
	(void)first;
	posix_fadvise(fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
	return 0;
}

static int es_digests_r(ckv_source *s, uint32_t pid, uint32_t layer, float *out, char *err,
			size_t errlen)
{
	int rc;

	err[0] = 0;
	rc = dig_each(es_of(s), pid, layer, err, errlen, dig_read_one, out);
	if (rc < 0 && !err[0])
		snprintf(err, errlen, "layer %u: cannot read the key digests (digest.bin): %s", layer,
			 strerror(-rc));
	return rc;
}

static void es_digests_hint(ckv_source *s, uint32_t pid, uint32_t layer)
{
	char err[256];

	dig_each(es_of(s), pid, layer, err, sizeof(err), dig_hint_one, NULL);
}

static int es_keyq_r(ckv_source *s, uint32_t pid, uint32_t layer, struct ckv_keyq *out, char *err,
		     size_t errlen)
{
	struct eprefix *ep = pfx_get(es_of(s), pid);

	memset(out, 0, sizeof(*out));
	if (!ep) {
		snprintf(err, errlen, "no open prefix with id %u", pid);
		return -EBADF;
	}
	return ckv_pview_keyq(ep->v, layer, 0, ckv_pview_manifest(ep->v)->chunks, out, err, errlen);
}

static int es_digests(ckv_source *s, uint32_t pid, uint32_t layer, float *out)
{
	return es_digests_r(s, pid, layer, out, s->err, sizeof(s->err));
}

static int es_resident(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		       const uint32_t *chunks, uint32_t n, uint8_t *out)
{
	struct esource *es = es_of(s);
	ckv_chunk_ref *refs = NULL;
	int rc;

	if (n == 0)
		return 0;
	rc = pfx_refs(es, pid, layer, part, chunks, n, NULL, 0, &refs);
	if (rc < 0)
		return rc;
	ckv_engine_resident_n(es->engine, refs, n, out);
	free(refs);
	return 0;
}

static void es_destroy(ckv_source *s)
{
	struct esource *es = es_of(s);

	if (!s)
		return;
	for (uint32_t i = 0; i < es->npfx; i++)
		eprefix_free(es, es->pfx[i]);
	free(es->pfx);
	if (es->engine)
		ckv_engine_close(es->engine);
	if (es->store)
		ckv_store_close(es->store);
	pthread_mutex_destroy(&es->lock);
	free(es);
}

static const struct ckv_source_ops es_ops = {
	.match = es_match,
	.open = es_open,
	.close = es_close,
	.get = es_get,
	.release = es_release,
	.prefetch = es_prefetch,
	.score = es_score,
	.digests = es_digests,
	.destroy = es_destroy,
	.resident = es_resident,
	.get_ex = es_get_ex,
	.cancel = es_cancel,
	.digests_r = es_digests_r,
	.digests_hint = es_digests_hint,
	.keyq_r = es_keyq_r,
	.pin_resident = es_pin_resident,
};

int ckv_source_embedded(const char *store, const ckv_source_opts *o, ckv_source **out,
			ckv_err *e)
{
	ckv_engine_opts eo = { 0 };
	struct esource *es;
	int rc;

	es = calloc(1, sizeof(*es));
	if (!es)
		return ckv_errf(e, -ENOMEM, "%s: out of memory", store);
	es->base.ops = &es_ops;
	pthread_mutex_init(&es->lock, NULL);
	rc = ckv_store_open(store, &es->store, e);
	if (rc < 0)
		goto out_destroy;
	eo.arena_bytes = o && o->arena_bytes ? o->arena_bytes : 0;
	eo.policy = o && o->policy == CKV_POLICY_LRU ? CKV_POLICY_LRU : CKV_POLICY_ATTN;
	rc = ckv_engine_open(&eo, &es->engine);
	if (rc < 0) {
		ckv_errf(e, rc, "%s: cannot start the chunk engine (arena %llu bytes): %s", store,
			 (unsigned long long)eo.arena_bytes, strerror(-rc));
		goto out_destroy;
	}
	es->base.arena = ckv_engine_arena_base(es->engine);
	es->base.arena_size = ckv_engine_arena_size(es->engine);
	es->base.arena_readonly = false;
	*out = &es->base;
	return 0;

out_destroy:
	es_destroy(&es->base);
	return rc;
}
