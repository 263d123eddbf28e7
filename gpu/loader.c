/*
 * loader.c — libckvgpu's loader (ckvgpu.h): where chunks come from (a
 * source: the embedded engine or a daemon), how they are copied (a
 * backend), the GPU tier in front of both, and chunk-granular fetches.
 *
 * A fetch, step by step:
 *   ckv_fetch_start: each chunk is looked up in the GPU tier (a hit is
 *     pinned there); the others go to the source in one get (one rbatch),
 *     which pins them in the arena as their reads complete.
 *   ckv_fetch_wait: wait for the get's completions; enqueue one gather from
 *     the arena (backend->gather: one launch), one device-to-device gather
 *     from the tier, and (part KV, tier on) one copy of each arena chunk
 *     into a fresh tier slot; then a release job (backend->after) that drops
 *     the arena pins and tier pins once the stream has executed the copies.
 *
 * Error messages: per loader and thread (a pthread key per loader); every
 * thread's buffer is on a list the loader frees at close. Messages of a
 * failed ckv_loader_open go to a thread-local buffer (there is no loader
 * to hold them); ckv_loader_error(NULL) returns it.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader_int.h"

static _Thread_local char open_err[512]; /* ckv_loader_error(NULL) */

double ckv_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- errors -------------------------------------------------------------- */

static char *errbuf_of(const ckv_loader *l)
{
	ckv_loader *ml = (ckv_loader *)l; /* the buffer list is not part of the loader's state */
	struct errbuf *b = pthread_getspecific(l->errkey);

	if (b)
		return b->msg;
	b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	if (pthread_setspecific(l->errkey, b) != 0) {
		free(b);
		return NULL;
	}
	pthread_mutex_lock(&ml->err_lock);
	b->next = ml->errbufs;
	ml->errbufs = b;
	pthread_mutex_unlock(&ml->err_lock);
	return b->msg;
}

int ckv_lerr(const ckv_loader *l, int rc, const char *fmt, ...)
{
	char *msg = l ? errbuf_of(l) : open_err;
	va_list ap;

	if (!msg)
		return rc;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(open_err), fmt, ap);
	va_end(ap);
	return rc;
}

int ckv_backend_reserve(ckv_loader *l, void **buf, uint64_t *have, uint64_t need,
			const char *what)
{
	ckv_backend *be = l->be;
	void *d = NULL;
	int rc;

	if (*have >= need)
		return 0;
	if (*buf)
		be->ops->free(be, *buf);
	*buf = NULL;
	*have = 0;
	rc = be->ops->alloc(be, need, &d);
	if (rc < 0)
		return ckv_lerr(l, rc, "%s: cannot allocate %llu bytes of %s memory", what,
				(unsigned long long)need, be->ops->name);
	*buf = d;
	*have = need;
	return 0;
}

const char *ckv_loader_error(const ckv_loader *l)
{
	const char *m;

	if (!l)
		return open_err;
	m = errbuf_of(l);
	return m ? m : "out of memory";
}

/* ---- open / close -------------------------------------------------------- */

static int backend_open(const ckv_loader_opts *o, ckv_backend **be, ckv_backend_kind *kind)
{
	ckv_backend_kind want = o->backend;
	int rc;

	if (want == CKV_BACKEND_CUDA || (want == CKV_BACKEND_AUTO && ckv_backend_cuda_built())) {
		rc = ckv_backend_cuda(o->device, be);
		if (rc == 0) {
			*kind = CKV_BACKEND_CUDA;
			return 0;
		}
		if (want == CKV_BACKEND_CUDA)
			return ckv_lerr(NULL, rc, "CUDA backend (device %d): %s", o->device,
					ckv_backend_cuda_built() ? strerror(-rc) :
								   "this build of libckvgpu has no CUDA");
	}
	if (want != CKV_BACKEND_AUTO && want != CKV_BACKEND_HOST && want != CKV_BACKEND_CUDA)
		return ckv_lerr(NULL, -EINVAL, "backend %d: expected AUTO, HOST or CUDA", (int)want);
	rc = ckv_backend_host(be);
	if (rc < 0)
		return ckv_lerr(NULL, rc, "host backend: %s", strerror(-rc));
	*kind = CKV_BACKEND_HOST;
	return 0;
}

/*
 * A mountpoint (a directory with .ckv/ctl) or a socket talks to a daemon;
 * anything else is opened as a store directory.
 */
static bool is_remote_path(const char *path)
{
	char ctl[PATH_MAX];
	struct stat st;

	if (stat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		return true;
	if (snprintf(ctl, sizeof(ctl), "%s/.ckv/ctl", path) >= (int)sizeof(ctl))
		return false;
	return stat(ctl, &st) == 0;
}

int ckv_loader_open(const char *path, const ckv_loader_opts *opts, ckv_loader **out)
{
	ckv_loader_opts o = { 0 };
	ckv_loader *l;
	ckv_err e = { { 0 } };
	struct stat st;
	int rc;

	open_err[0] = 0;
	if (!path || !out)
		return ckv_lerr(NULL, -EINVAL, "ckv_loader_open: path and out are required");
	if (opts)
		o = *opts;
	if (stat(path, &st) < 0)
		return ckv_lerr(NULL, -errno, "%s: %s", path, strerror(errno));
	l = calloc(1, sizeof(*l));
	if (!l)
		return ckv_lerr(NULL, -ENOMEM, "%s: out of memory", path);
	pthread_mutex_init(&l->err_lock, NULL);
	pthread_mutex_init(&l->src_lock, NULL);
	rc = -pthread_key_create(&l->errkey, NULL);
	if (rc < 0) {
		pthread_mutex_destroy(&l->src_lock);
		pthread_mutex_destroy(&l->err_lock);
		free(l);
		return ckv_lerr(NULL, rc, "%s: no thread-specific key for error messages", path);
	}
	atomic_init(&l->nprefixes, 0);

	l->remote = is_remote_path(path);
	if (l->remote) {
		rc = ckv_source_remote(path, &l->src, &e);
	} else {
		ckv_source_opts so = { .arena_bytes = o.arena_bytes, .policy = o.policy };

		rc = ckv_source_embedded(path, &so, &l->src, &e);
	}
	if (rc < 0) {
		ckv_lerr(NULL, rc, "%s", e.msg[0] ? e.msg : strerror(-rc));
		goto out_close;
	}
	rc = backend_open(&o, &l->be, &l->kind);
	if (rc < 0)
		goto out_close;
	rc = l->be->ops->register_arena(l->be, l->src->arena, l->src->arena_size,
					l->src->arena_readonly);
	if (rc < 0) {
		ckv_lerr(NULL, rc, "%s: the %s backend cannot register the arena (%llu bytes%s): %s",
			 path, l->be->ops->name, (unsigned long long)l->src->arena_size,
			 l->src->arena_readonly ? ", read-only" : "", strerror(-rc));
		goto out_close;
	}
	l->arena_registered = true;
	if (o.gpu_cache_bytes) {
		if (l->kind != CKV_BACKEND_HOST && !l->be->ops->gather_dev) {
			rc = ckv_lerr(NULL, -ENOTSUP,
				      "gpu_cache_bytes: the %s backend has no device-to-device gather",
				      l->be->ops->name);
			goto out_close;
		}
		rc = ckv_tier_create(l->be, o.gpu_cache_bytes, 600.0, &l->tier);
		if (rc < 0) {
			ckv_lerr(NULL, rc, "%s: out of memory", path);
			goto out_close;
		}
	}
	*out = l;
	return 0;

out_close:
	{
		char keep[sizeof(open_err)];

		memcpy(keep, open_err, sizeof(keep));
		ckv_loader_close(l);
		memcpy(open_err, keep, sizeof(keep));
	}
	return rc;
}

void ckv_loader_close(ckv_loader *l)
{
	if (!l)
		return;
	/* prefixes must be closed first (ckvgpu.h); their jobs have run then */
	if (atomic_load(&l->nprefixes) != 0)
		fprintf(stderr, "ckv_loader_close: %u prefixes still open\n", atomic_load(&l->nprefixes));
	ckv_tier_destroy(l->tier);
	if (l->arena_registered)
		l->be->ops->unregister_arena(l->be);
	if (l->be)
		l->be->ops->destroy(l->be);
	if (l->src)
		l->src->ops->destroy(l->src);
	pthread_key_delete(l->errkey);
	while (l->errbufs) {
		struct errbuf *b = l->errbufs;

		l->errbufs = b->next;
		free(b);
	}
	pthread_mutex_destroy(&l->src_lock);
	pthread_mutex_destroy(&l->err_lock);
	free(l);
}

bool ckv_loader_remote(const ckv_loader *l)
{
	return l && l->remote;
}

ckv_backend_kind ckv_loader_backend(const ckv_loader *l)
{
	return l ? l->kind : CKV_BACKEND_AUTO;
}

void ckv_loader_get_stats(const ckv_loader *l, ckv_loader_stats *st)
{
	ckv_loader *ml = (ckv_loader *)l;

	memset(st, 0, sizeof(*st));
	if (!l)
		return;
	st->hits_gpu = atomic_load_explicit(&ml->st.hits_gpu, memory_order_relaxed);
	st->hits_arena = atomic_load_explicit(&ml->st.hits_arena, memory_order_relaxed);
	st->misses = atomic_load_explicit(&ml->st.misses, memory_order_relaxed);
	st->bytes_k = atomic_load_explicit(&ml->st.bytes_k, memory_order_relaxed);
	st->bytes_v = atomic_load_explicit(&ml->st.bytes_v, memory_order_relaxed);
	if (l->tier)
		ckv_tier_usage(l->tier, &st->gpu_tier_bytes, &st->gpu_tier_used,
			       &st->gpu_tier_evictions);
}

int ckv_loader_alloc(ckv_loader *l, uint64_t bytes, void **out)
{
	int rc;

	if (!l || !out || bytes == 0)
		return l ? ckv_lerr(l, -EINVAL, "alloc: size 0 or no out") : -EINVAL;
	rc = l->be->ops->alloc(l->be, bytes, out);
	if (rc < 0)
		return ckv_lerr(l, rc, "alloc: %llu bytes of %s memory: %s", (unsigned long long)bytes,
				l->be->ops->name, strerror(-rc));
	return 0;
}

void ckv_loader_free(ckv_loader *l, void *p)
{
	if (l && p)
		l->be->ops->free(l->be, p);
}

int ckv_loader_to_host(ckv_loader *l, void *host, const void *src, uint64_t len)
{
	int rc;

	if (!l || (len && (!host || !src)))
		return -EINVAL;
	rc = len ? l->be->ops->to_host(l->be, host, src, len) : 0;
	if (rc < 0)
		return ckv_lerr(l, rc, "copy to host (%llu bytes): %s", (unsigned long long)len,
				strerror(-rc));
	return 0;
}

int ckv_loader_from_host(ckv_loader *l, void *dst, const void *host, uint64_t len)
{
	int rc;

	if (!l || (len && (!host || !dst)))
		return -EINVAL;
	rc = len ? l->be->ops->from_host(l->be, dst, host, len) : 0;
	if (rc < 0)
		return ckv_lerr(l, rc, "copy from host (%llu bytes): %s", (unsigned long long)len,
				strerror(-rc));
	return 0;
}

int ckv_loader_sync(ckv_loader *l, void *stream)
{
	int rc;

	if (!l)
		return -EINVAL;
	rc = l->be->ops->sync(l->be, stream);
	if (rc < 0)
		return ckv_lerr(l, rc, "stream synchronize: %s", strerror(-rc));
	return 0;
}

const void *ckv_loader_arena(const ckv_loader *l, uint64_t *size)
{
	if (size)
		*size = l ? l->src->arena_size : 0;
	return l ? l->src->arena : NULL;
}

/* ---- match --------------------------------------------------------------- */

static const char *const shape_keys[] = { "model", "salt", "dtype", "layers", "kv_heads",
					  "head_dim", "chunk" };

/* Length of the value starting at v: up to a ',' that starts another key=. */
static size_t value_len(const char *v)
{
	for (const char *c = strchr(v, ','); c; c = strchr(c + 1, ','))
		for (size_t k = 0; k < sizeof(shape_keys) / sizeof(shape_keys[0]); k++) {
			size_t n = strlen(shape_keys[k]);

			if (strncmp(c + 1, shape_keys[k], n) == 0 && c[1 + n] == '=')
				return (size_t)(c - v);
		}
	return strlen(v);
}

static int parse_u32(const char *v, size_t n, uint32_t *out)
{
	char buf[16], *end;
	unsigned long x;

	if (n == 0 || n >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, v, n);
	buf[n] = 0;
	errno = 0;
	x = strtoul(buf, &end, 10);
	if (errno || *end || buf[0] == '-' || x > UINT32_MAX)
		return -EINVAL;
	*out = (uint32_t)x;
	return 0;
}

/*
 * "qwen2.5-7b" or "model=<id>,dtype=bf16,layers=28,kv_heads=4,head_dim=128,
 * chunk=16[,salt=]" (a preset name may also come first, then overrides).
 */
static int parse_shape(const ckv_loader *l, const char *shape, ckv_geom *g)
{
	const char *p = shape;
	ckv_err e = { { 0 } };
	int rc;

	memset(g, 0, sizeof(*g));
	g->dtype = CKV_DTYPE_BF16;
	g->chunk_tokens = 16;
	if (!strchr(shape, '=') || (strchr(shape, ',') && strchr(shape, ',') < strchr(shape, '='))) {
		size_t n = strcspn(shape, ",");
		char name[64];

		if (n >= sizeof(name))
			return ckv_lerr(l, -EINVAL, "shape '%s': unknown preset", shape);
		memcpy(name, shape, n);
		name[n] = 0;
		if (ckv_geom_preset(g, name) < 0)
			return ckv_lerr(l, -EINVAL,
					"shape '%s': not a preset (qwen2.5-0.5b ... qwen2.5-72b) nor key=value list",
					shape);
		p = shape + n + (shape[n] == ',');
	}
	while (*p) {
		const char *eq = strchr(p, '=');
		const char *v;
		size_t kn, vn;
		bool ok = false;

		if (!eq)
			return ckv_lerr(l, -EINVAL, "shape '%s': expected key=value at '%s'", shape, p);
		kn = (size_t)(eq - p);
		v = eq + 1;
		vn = value_len(v);
		if (kn == 5 && !strncmp(p, "model", 5) && vn < sizeof(g->model)) {
			memcpy(g->model, v, vn);
			g->model[vn] = 0;
			ok = vn > 0;
		} else if (kn == 4 && !strncmp(p, "salt", 4) && vn < sizeof(g->salt)) {
			memcpy(g->salt, v, vn);
			g->salt[vn] = 0;
			ok = true;
		} else if (kn == 5 && !strncmp(p, "dtype", 5)) {
			char d[16];

			if (vn < sizeof(d)) {
				memcpy(d, v, vn);
				d[vn] = 0;
				g->dtype = ckv_dtype_parse(d);
				ok = g->dtype != CKV_DTYPE_INVALID;
			}
		} else if (kn == 6 && !strncmp(p, "layers", 6)) {
			ok = parse_u32(v, vn, &g->layers) == 0;
		} else if (kn == 8 && !strncmp(p, "kv_heads", 8)) {
			ok = parse_u32(v, vn, &g->kv_heads) == 0;
		} else if (kn == 8 && !strncmp(p, "head_dim", 8)) {
			ok = parse_u32(v, vn, &g->head_dim) == 0;
		} else if (kn == 5 && !strncmp(p, "chunk", 5)) {
			ok = parse_u32(v, vn, &g->chunk_tokens) == 0;
		} else {
			return ckv_lerr(l, -EINVAL,
					"shape '%s': unknown key '%.*s' (model, salt, dtype, layers, kv_heads, head_dim, chunk)",
					shape, (int)kn, p);
		}
		if (!ok)
			return ckv_lerr(l, -EINVAL, "shape '%s': bad value for %.*s", shape, (int)kn, p);
		p = v + vn;
		if (*p == ',')
			p++;
	}
	rc = ckv_geom_init(g, &e);
	if (rc < 0)
		return ckv_lerr(l, rc, "shape '%s': %s", shape, e.msg);
	return 0;
}

int ckv_loader_match(ckv_loader *l, const char *shape, const uint32_t *tokens, uint32_t n,
		     char hash[33], uint32_t *matched)
{
	ckv_geom g;
	ckv_hash h;
	uint32_t got = 0;
	int rc;

	if (!l || !shape || (n && !tokens) || !hash || !matched)
		return l ? ckv_lerr(l, -EINVAL, "ckv_loader_match: missing argument") : -EINVAL;
	rc = parse_shape(l, shape, &g);
	if (rc < 0)
		return rc;
	hash[0] = 0;
	*matched = 0;
	if (n == 0)
		return 0;
	pthread_mutex_lock(&l->src_lock);
	l->src->err[0] = 0;
	rc = l->src->ops->match(l->src, &g, tokens, n, &h, &got);
	if (rc < 0)
		ckv_lerr(l, rc, "match: %s", l->src->err[0] ? l->src->err : strerror(-rc));
	pthread_mutex_unlock(&l->src_lock);
	if (rc < 0)
		return rc;
	*matched = got;
	if (got)
		ckv_hash_hex(&h, hash);
	return 0;
}

/* ---- prefixes ------------------------------------------------------------ */

int ckv_prefix_open(ckv_loader *l, const char *hash, ckv_prefix **out)
{
	ckv_prefix *p;
	ckv_hash h;
	const ckv_geom *g;
	int rc;

	if (!l || !hash || !out)
		return l ? ckv_lerr(l, -EINVAL, "ckv_prefix_open: missing argument") : -EINVAL;
	if (ckv_hash_parse(&h, hash) < 0)
		return ckv_lerr(l, -EINVAL, "prefix hash '%s': expected 32 lowercase hex digits", hash);
	p = calloc(1, sizeof(*p));
	if (!p)
		return ckv_lerr(l, -ENOMEM, "prefix %s: out of memory", hash);
	p->l = l;
	pthread_mutex_init(&p->jobs_lock, NULL);
	pthread_cond_init(&p->jobs_cv, NULL);
	pthread_mutex_init(&p->dig_lock, NULL);
	p->dig_cap = DIG_CACHE_BYTES;
	pthread_cond_init(&p->dig_cv, NULL);
	pthread_mutex_lock(&l->src_lock);
	l->src->err[0] = 0;
	rc = l->src->ops->open(l->src, &h, &p->m, &p->pid);
	if (rc < 0)
		ckv_lerr(l, rc, "%s", l->src->err[0] ? l->src->err : strerror(-rc));
	pthread_mutex_unlock(&l->src_lock);
	if (rc < 0)
		goto out_free;
	g = &p->m->geom;
	if (!g->layers || !g->chunk_bytes || !p->m->chunks || !ckv_dtype_size(g->dtype)) {
		rc = ckv_lerr(l, -EIO, "prefix %s: the source gave an empty geometry", hash);
		goto out_close;
	}
	ckv_hash_hex(&p->m->hash, p->shape.hash);
	snprintf(p->shape.model, sizeof(p->shape.model), "%s", g->model);
	snprintf(p->shape.dtype, sizeof(p->shape.dtype), "%s", ckv_dtype_name(g->dtype));
	p->shape.layers = g->layers;
	p->shape.kv_heads = g->kv_heads;
	p->shape.head_dim = g->head_dim;
	p->shape.chunk_tokens = g->chunk_tokens;
	p->shape.tokens = p->m->tokens;
	p->shape.chunks = p->m->chunks;
	p->shape.chunk_bytes = g->chunk_bytes;
	p->shape.half_bytes = g->half_bytes;
	p->dig = calloc(g->layers, sizeof(*p->dig));
	p->dig_q = calloc(g->layers, sizeof(*p->dig_q));
	if (!p->dig || !p->dig_q) {
		rc = ckv_lerr(l, -ENOMEM, "prefix %s: out of memory", hash);
		goto out_close;
	}
	{
		uint64_t lo, hi;

		memcpy(&hi, p->m->hash.b, 8);
		memcpy(&lo, p->m->hash.b + 8, 8);
		p->key_base = hi ^ (lo * 0x9e3779b97f4a7c15ull);
	}
	if (p->m->nextents && p->m->extents) {
		uint64_t acc = 0;

		p->ext_start = malloc(sizeof(*p->ext_start) * ((size_t)p->m->nextents + 1));
		p->seg_hash = malloc(sizeof(*p->seg_hash) * p->m->nextents);
		if (!p->ext_start || !p->seg_hash) {
			rc = ckv_lerr(l, -ENOMEM, "prefix %s: out of memory", hash);
			goto out_close;
		}
		for (uint32_t x = 0; x < p->m->nextents; x++) {
			p->ext_start[x] = (uint32_t)acc;
			acc += p->m->extents[x].count;
			p->seg_hash[x] = XXH3_64bits(p->m->extents[x].segment,
						     strnlen(p->m->extents[x].segment,
							     sizeof(p->m->extents[x].segment)));
		}
		p->ext_start[p->m->nextents] = (uint32_t)acc;
		if (acc != p->m->chunks) { /* not a usable extent list: key by prefix */
			free(p->ext_start);
			free(p->seg_hash);
			p->ext_start = NULL;
			p->seg_hash = NULL;
		}
	}
	atomic_fetch_add(&l->nprefixes, 1);
	*out = p;
	return 0;

out_close:
	l->src->ops->close(l->src, p->pid);
out_free:
	if (p->m) {
		ckv_manifest_free(p->m);
		free(p->m);
	}
	free(p->ext_start);
	free(p->seg_hash);
	free(p->dig);
	free(p->dig_q);
	pthread_cond_destroy(&p->dig_cv);
	pthread_mutex_destroy(&p->dig_lock);
	pthread_cond_destroy(&p->jobs_cv);
	pthread_mutex_destroy(&p->jobs_lock);
	free(p);
	return rc;
}

void ckv_prefix_close(ckv_prefix *p)
{
	ckv_loader *l;

	if (!p)
		return;
	l = p->l;
	/* release jobs still queued behind copies hold pins of this prefix */
	pthread_mutex_lock(&p->jobs_lock);
	while (p->jobs)
		pthread_cond_wait(&p->jobs_cv, &p->jobs_lock);
	pthread_mutex_unlock(&p->jobs_lock);
	/* the digest thread reads through the source: stop it before the source closes */
	pthread_mutex_lock(&p->dig_lock);
	p->dig_stop = true;
	pthread_cond_broadcast(&p->dig_cv);
	pthread_mutex_unlock(&p->dig_lock);
	if (p->dig_thread_on)
		pthread_join(p->dig_thread, NULL);
	l->src->ops->close(l->src, p->pid);
	if (p->dig_dev)
		l->be->ops->free(l->be, p->dig_dev);
	if (p->kq_dev)
		l->be->ops->free(l->be, p->kq_dev);
	for (uint32_t x = 0; x < p->shape.layers; x++)
		free(p->dig[x].data);
	free(p->dig);
	free(p->dig_q);
	pthread_cond_destroy(&p->dig_cv);
	pthread_mutex_destroy(&p->dig_lock);
	ckv_manifest_free(p->m);
	free(p->m);
	free(p->ext_start);
	free(p->seg_hash);
	pthread_cond_destroy(&p->jobs_cv);
	pthread_mutex_destroy(&p->jobs_lock);
	atomic_fetch_sub(&l->nprefixes, 1);
	free(p);
}

void ckv_prefix_shape(const ckv_prefix *p, ckv_shape *out)
{
	*out = p->shape;
}

/*
 * The GPU tier's name of a physical chunk: (segment, layer, chunk in the
 * segment) when the source gave extents, so a parent and its extension
 * share entries; else (prefix, layer, chunk).
 */
ckv_tkey ckv_prefix_chunk_key(const ckv_prefix *p, uint32_t layer, uint32_t chunk)
{
	ckv_tkey k;

	if (p->ext_start) {
		uint32_t lo = 0, hi = p->m->nextents;

		while (hi - lo > 1) {
			uint32_t mid = lo + (hi - lo) / 2;

			if (p->ext_start[mid] <= chunk)
				lo = mid;
			else
				hi = mid;
		}
		k.a = p->seg_hash[lo];
		k.b = (uint64_t)layer << 32 | (p->m->extents[lo].first + (chunk - p->ext_start[lo]));
	} else {
		k.a = p->key_base;
		k.b = (uint64_t)layer << 32 | chunk;
	}
	return k;
}

/*
 * Read a layer's digests from the source into out. With digests_r any
 * thread may do it at once; else under src_lock (the source's message
 * buffer). The message goes to err.
 */
static int digests_read(ckv_prefix *p, uint32_t layer, float *out, char *err, size_t errlen)
{
	ckv_loader *l = p->l;
	int rc;

	err[0] = 0;
	if (l->src->ops->digests_r)
		return l->src->ops->digests_r(l->src, p->pid, layer, out, err, errlen);
	pthread_mutex_lock(&l->src_lock);
	l->src->err[0] = 0;
	rc = l->src->ops->digests(l->src, p->pid, layer, out);
	if (rc < 0)
		snprintf(err, errlen, "%.*s", (int)(errlen - 1), l->src->err);
	pthread_mutex_unlock(&l->src_lock);
	return rc;
}

int ckv_prefix_digests(ckv_prefix *p, uint32_t layer, float *out)
{
	char err[256];
	int rc = digests_read(p, layer, out, err, sizeof(err));

	if (rc < 0)
		ckv_lerr(p->l, rc, "prefix %s layer %u: %s", p->shape.hash, layer,
			 err[0] ? err : "cannot read the key digests");
	return rc;
}

int ckv_prefix_keyq(ckv_prefix *p, uint32_t layer, struct ckv_keyq *out)
{
	char err[320];
	int rc;

	memset(out, 0, sizeof(*out));
	if (!p->l->src->ops->keyq_r)
		return ckv_lerr(p->l, -ENOTSUP,
				"prefix %s: this source has no key copies",
				p->shape.hash);
	err[0] = 0;
	/* under the source's lock: a remote source's messages go through s->err too */
	pthread_mutex_lock(&p->l->src_lock);
	rc = p->l->src->ops->keyq_r(p->l->src, p->pid, layer, out, err, sizeof(err));
	pthread_mutex_unlock(&p->l->src_lock);
	if (rc < 0)
		ckv_lerr(p->l, rc, "prefix %s layer %u: %s", p->shape.hash, layer,
			 err[0] ? err : "cannot read the key copy");
	return rc;
}

uint64_t ckv_prefix_keyq_bytes(const ckv_prefix *p, const struct ckv_keyq *k)
{
	uint64_t chunks = k->nparts ? k->first[k->nparts] - k->first[0] : 0;

	return k->nparts * 4ull * p->shape.kv_heads * p->shape.head_dim + chunks * k->per;
}

uint64_t ckv_prefix_digest_bytes(const ckv_prefix *p)
{
	return (uint64_t)p->shape.chunks * p->shape.kv_heads * p->shape.head_dim * sizeof(float);
}

/*
 * Free unpinned cached layers, least recently used first, until the cache
 * holds at most p->dig_cap, but never keep (the layer just read, which its
 * reader is about to pin: a layer larger than the cap stays until the next
 * one is read). dig_lock held.
 */
static void dig_trim(ckv_prefix *p, const struct dig_ent *keep)
{
	uint64_t per = ckv_prefix_digest_bytes(p);

	while (p->dig_bytes > p->dig_cap) {
		struct dig_ent *v = NULL;

		for (uint32_t x = 0; x < p->shape.layers; x++) {
			struct dig_ent *d = &p->dig[x];

			if (d != keep && d->state == DIG_READY && d->pins == 0 &&
			    (!v || d->stamp < v->stamp))
				v = d;
		}
		if (!v)
			return;
		free(v->data);
		v->data = NULL;
		v->state = DIG_NONE;
		p->dig_bytes -= per;
	}
}

/*
 * Read layer (state LOADING, claimed by the caller) and publish the result.
 * Called without dig_lock; returns with it held.
 */
static void dig_load(ckv_prefix *p, uint32_t layer)
{
	uint64_t bytes = ckv_prefix_digest_bytes(p);
	float *buf = malloc(bytes ? bytes : 1);
	char err[256] = "";
	int rc = buf ? digests_read(p, layer, buf, err, sizeof(err)) : -ENOMEM;
	struct dig_ent *d;

	pthread_mutex_lock(&p->dig_lock);
	d = &p->dig[layer];
	if (rc == 0) {
		d->data = buf;
		d->state = DIG_READY;
		d->stamp = ++p->dig_stamp;
		p->dig_bytes += bytes;
		dig_trim(p, d);
	} else {
		free(buf);
		d->state = DIG_FAILED;
		d->rc = rc;
		snprintf(d->err, sizeof(d->err), "%s", err[0] ? err : strerror(-rc));
	}
	pthread_cond_broadcast(&p->dig_cv);
}

/*
 * The digest thread: tell the source about every queued layer (its reads
 * start at once, side by side), then read the first into the cache.
 */
static void *dig_main(void *arg)
{
	ckv_prefix *p = arg;
	ckv_source *src = p->l->src;
	uint32_t *hint = malloc(sizeof(*hint) * p->shape.layers);

	pthread_mutex_lock(&p->dig_lock);
	for (;;) {
		uint32_t layer, nh = 0;

		while (!p->dig_stop && p->dig_qn == 0)
			pthread_cond_wait(&p->dig_cv, &p->dig_lock);
		if (p->dig_stop)
			break;
		for (uint32_t k = 0; hint && src->ops->digests_hint && k < p->dig_qn; k++) {
			struct dig_ent *d = &p->dig[p->dig_q[(p->dig_qh + k) % p->shape.layers]];

			if (d->state == DIG_QUEUED && !d->hinted) {
				d->hinted = true;
				hint[nh++] = p->dig_q[(p->dig_qh + k) % p->shape.layers];
			}
		}
		if (nh) {
			pthread_mutex_unlock(&p->dig_lock);
			for (uint32_t k = 0; k < nh; k++)
				src->ops->digests_hint(src, p->pid, hint[k]);
			pthread_mutex_lock(&p->dig_lock);
			continue; /* the queue may have changed */
		}
		layer = p->dig_q[p->dig_qh];
		p->dig_qh = (p->dig_qh + 1) % p->shape.layers;
		p->dig_qn--;
		if (p->dig[layer].state != DIG_QUEUED)
			continue; /* taken over by a reader */
		p->dig[layer].state = DIG_LOADING;
		pthread_mutex_unlock(&p->dig_lock);
		dig_load(p, layer);
	}
	pthread_mutex_unlock(&p->dig_lock);
	free(hint);
	return NULL;
}

int ckv_prefix_digests_ahead(ckv_prefix *p, uint32_t layer)
{
	struct dig_ent *d;
	int rc = 0;

	if (!p || layer >= p->shape.layers)
		return -EINVAL;
	pthread_mutex_lock(&p->dig_lock);
	d = &p->dig[layer];
	if (d->state == DIG_FAILED)
		d->state = DIG_NONE; /* try again */
	if (d->state != DIG_NONE || p->dig_stop)
		goto out_unlock;
	if (!p->dig_thread_on) {
		if (pthread_create(&p->dig_thread, NULL, dig_main, p) != 0)
			goto out_unlock; /* the reader will read it */
		p->dig_thread_on = true;
	}
	/* the ring holds each layer at most once while queued; a taken-over entry may linger */
	if (p->dig_qn == p->shape.layers)
		goto out_unlock;
	p->dig_q[(p->dig_qh + p->dig_qn) % p->shape.layers] = layer;
	p->dig_qn++;
	d->state = DIG_QUEUED;
	d->hinted = false;
	pthread_cond_broadcast(&p->dig_cv);
	rc = 1;
out_unlock:
	pthread_mutex_unlock(&p->dig_lock);
	return rc;
}

int ckv_prefix_digests_get(ckv_prefix *p, uint32_t layer, const float **out, int *how,
			   double *waited)
{
	struct dig_ent *d = &p->dig[layer];
	double t0 = 0;
	int got = DIG_GOT_CACHED, rc = 0;

	*waited = 0;
	pthread_mutex_lock(&p->dig_lock);
	for (;;) {
		if (d->state == DIG_READY)
			break;
		if (d->state == DIG_LOADING) { /* the thread reads it: wait */
			if (t0 == 0)
				t0 = ckv_now();
			got = DIG_GOT_AHEAD;
			pthread_cond_wait(&p->dig_cv, &p->dig_lock);
			continue;
		}
		if (d->state == DIG_FAILED) {
			rc = ckv_lerr(p->l, d->rc, "prefix %s layer %u: %s", p->shape.hash, layer, d->err);
			d->state = DIG_NONE;
			goto out_unlock;
		}
		/* NONE, or QUEUED and not started (the thread will skip it): read it here */
		got = DIG_GOT_READ;
		d->state = DIG_LOADING;
		pthread_mutex_unlock(&p->dig_lock);
		dig_load(p, layer);
		if (d->state != DIG_READY) {
			rc = ckv_lerr(p->l, d->rc, "prefix %s layer %u: %s", p->shape.hash, layer, d->err);
			d->state = DIG_NONE;
			goto out_unlock;
		}
		break;
	}
	if (t0 != 0)
		*waited = ckv_now() - t0;
	d->pins++;
	d->stamp = ++p->dig_stamp;
	*out = d->data;
	*how = got;
out_unlock:
	pthread_mutex_unlock(&p->dig_lock);
	return rc;
}

void ckv_prefix_digests_put(ckv_prefix *p, uint32_t layer)
{
	pthread_mutex_lock(&p->dig_lock);
	if (p->dig[layer].pins > 0)
		p->dig[layer].pins--;
	dig_trim(p, NULL);
	pthread_mutex_unlock(&p->dig_lock);
}

/* ---- read batches -------------------------------------------------------- */

static void rbatch_cb(void *arg, uint32_t i, uint64_t off, uint64_t len, uint64_t token, int rc)
{
	struct rbatch *b = arg;

	if (i >= b->n)
		return; /* a source bug; the batch would never complete, the wait says so */
	b->off[i] = off;
	b->tok[i] = token;
	b->rc[i] = rc;
	b->len[i] = len;
	if (atomic_fetch_sub_explicit(&b->pending, 1, memory_order_acq_rel) == 1) {
		pthread_mutex_lock(&b->mu);
		atomic_store_explicit(&b->fin, true, memory_order_release);
		pthread_cond_broadcast(&b->cv);
		pthread_mutex_unlock(&b->mu); /* b may be freed by its owner from here on */
	}
}

/* Bytes a disk read of one chunk request of part counts: K and V (+ padding). */
static void miss_bytes(const ckv_shape *sh, enum ckv_source_part part, uint64_t *bk, uint64_t *bv)
{
	uint64_t bytes = ckv_part_bytes(sh, part);

	*bk = part == CKV_SRC_V ? 0 : part == CKV_SRC_KV ? sh->half_bytes : bytes;
	*bv = bytes - *bk;
}

/* Add (sign 1) or take back (sign -1) n disk reads and h arena hits to the counters. */
static void count_reads(ckv_loader *l, struct rstats *rs, const ckv_shape *sh,
			enum ckv_source_part part, uint64_t h, uint64_t n, int sign)
{
	uint64_t bk, bv;

	miss_bytes(sh, part, &bk, &bv);
	bk *= n;
	bv *= n;
	if (sign > 0) {
		atomic_fetch_add_explicit(&l->st.hits_arena, h, memory_order_relaxed);
		atomic_fetch_add_explicit(&l->st.misses, n, memory_order_relaxed);
		atomic_fetch_add_explicit(&l->st.bytes_k, bk, memory_order_relaxed);
		atomic_fetch_add_explicit(&l->st.bytes_v, bv, memory_order_relaxed);
		if (rs) {
			rs->hits_arena += h;
			rs->misses += n;
			rs->bytes_k += bk;
			rs->bytes_v += bv;
		}
	} else {
		atomic_fetch_sub_explicit(&l->st.misses, n, memory_order_relaxed);
		atomic_fetch_sub_explicit(&l->st.bytes_k, bk, memory_order_relaxed);
		atomic_fetch_sub_explicit(&l->st.bytes_v, bv, memory_order_relaxed);
		if (rs) {
			rs->misses -= n;
			rs->bytes_k -= bk;
			rs->bytes_v -= bv;
		}
	}
}

/* One allocation: the batch and its arrays (8-byte ones first). */
static struct rbatch *rbatch_alloc(uint32_t n)
{
	size_t sz = sizeof(struct rbatch) + (size_t)n * (3 * sizeof(uint64_t) + 2 * sizeof(uint32_t) + 2);
	struct rbatch *b = calloc(1, sz);
	uint8_t *q;

	if (!b)
		return NULL;
	q = (uint8_t *)(b + 1);
	b->off = (uint64_t *)q;
	b->tok = b->off + n;
	b->len = b->tok + n;
	b->chunks = (uint32_t *)(b->len + n);
	b->rc = (int *)(b->chunks + n);
	b->state = (uint8_t *)(b->rc + n);
	b->miss = b->state + n;
	return b;
}

int ckv_rbatch_issue_ex(ckv_prefix *p, uint32_t layer, enum ckv_source_part part,
			const uint32_t *chunks, uint32_t n, bool idle, struct rstats *rs,
			struct rbatch **out)
{
	ckv_loader *l = p->l;
	ckv_source *src = l->src;
	uint64_t hits = 0;
	struct rbatch *b;
	int rc;

	b = rbatch_alloc(n);
	if (!b)
		return ckv_lerr(l, -ENOMEM, "prefix %s layer %u: out of memory", p->shape.hash, layer);
	b->p = p;
	b->layer = layer;
	b->part = part;
	b->n = n;
	b->unresolved = n;
	atomic_init(&b->pending, n);
	atomic_init(&b->fin, false);
	b->rs = rs;
	b->idle = idle && src->ops->get_ex && src->ops->cancel;
	memcpy(b->chunks, chunks, sizeof(*chunks) * n);
	pthread_mutex_init(&b->mu, NULL);
	pthread_cond_init(&b->cv, NULL);

	/* b->miss holds "resident" until the get is in */
	if (src->ops->get_ex) {
		rc = src->ops->get_ex(src, p->pid, layer, part, b->chunks, n,
				      b->idle ? CKV_SRC_GET_IDLE : 0, rbatch_cb, b, b->miss, &b->handle);
	} else {
		if (!src->ops->resident ||
		    src->ops->resident(src, p->pid, layer, part, chunks, n, b->miss) < 0)
			memset(b->miss, 0, n);
		rc = src->ops->get(src, p->pid, layer, part, b->chunks, n, rbatch_cb, b);
	}
	if (rc < 0) {
		atomic_store(&b->pending, 0); /* the failed get made no callback */
		atomic_store(&b->fin, true);
		for (uint32_t i = 0; i < n; i++) {
			b->rc[i] = rc;
			b->state[i] = RB_DONE;
			b->miss[i] = 0;
		}
		b->unresolved = 0;
		*out = b;
		return ckv_lerr(l, rc, "prefix %s layer %u: %s", p->shape.hash, layer,
				src->err[0] ? src->err : strerror(-rc));
	}
	for (uint32_t i = 0; i < n; i++) {
		hits += b->miss[i] != 0;
		b->miss[i] = !b->miss[i];
	}
	count_reads(l, rs, &p->shape, part, hits, n - hits, 1);
	*out = b;
	return 0;
}

int ckv_rbatch_issue(ckv_prefix *p, uint32_t layer, enum ckv_source_part part,
		     const uint32_t *chunks, uint32_t n, struct rstats *rs, struct rbatch **out)
{
	return ckv_rbatch_issue_ex(p, layer, part, chunks, n, false, rs, out);
}

uint32_t ckv_rbatch_withdraw(struct rbatch *b, const uint32_t *idx, uint32_t n, uint8_t *done)
{
	ckv_prefix *p = b->p;
	ckv_source *src = p->l->src;
	uint32_t got = 0, nmiss = 0;
	uint32_t stack[64], *ch = n <= 64 ? stack : malloc(sizeof(*ch) * n);
	int rc = -ENOENT;

	memset(done, 0, n);
	if (!b->idle || !b->handle || n == 0 || !ch) {
		if (ch != stack)
			free(ch);
		return 0;
	}
	for (uint32_t k = 0; k < n; k++)
		ch[k] = b->chunks[idx[k]];
	/* while fin is unset under b->mu the get's last callback cannot finish: the handle lives */
	pthread_mutex_lock(&b->mu);
	if (!atomic_load(&b->fin))
		rc = src->ops->cancel(src, b->handle, p->pid, b->layer, b->part, ch, idx, n, done);
	pthread_mutex_unlock(&b->mu);
	if (ch != stack)
		free(ch);
	if (rc < 0) {
		memset(done, 0, n);
		return 0;
	}
	for (uint32_t k = 0; k < n; k++) {
		uint32_t i = idx[k];

		if (!done[k])
			continue;
		got++;
		if (b->state[i] == RB_HELD)
			b->state[i] = RB_DROP; /* its -ECANCELED completion releases nothing */
		if (b->miss[i]) {
			b->miss[i] = 0;
			nmiss++;
		}
	}
	if (nmiss)
		count_reads(p->l, b->rs, &p->shape, b->part, 0, nmiss, -1);
	return got;
}

void ckv_rbatch_wait(struct rbatch *b)
{
	if (ckv_rbatch_complete(b))
		return;
	pthread_mutex_lock(&b->mu);
	while (!atomic_load(&b->fin))
		pthread_cond_wait(&b->cv, &b->mu);
	pthread_mutex_unlock(&b->mu);
}

bool ckv_rbatch_complete(struct rbatch *b)
{
	return atomic_load_explicit(&b->fin, memory_order_acquire);
}

/* Whether a chunk the source delivered at [off, off + len) is whole and inside the arena. */
static bool in_arena(const ckv_source *src, uint64_t off, uint64_t len, uint64_t want)
{
	return len == want && off <= src->arena_size && src->arena_size - off >= want;
}

int ckv_rbatch_check(const struct rbatch *b, uint32_t i)
{
	const ckv_prefix *p = b->p;

	if (b->rc[i] < 0)
		return b->rc[i];
	if (!in_arena(p->l->src, b->off[i], b->len[i], ckv_part_bytes(&p->shape, b->part)))
		return -EIO;
	return 0;
}

/* Release the pins of indices idx[0..n) (complete, rc 0). */
static void release_idx(struct rbatch *b, const uint32_t *idx, uint32_t n)
{
	ckv_source *src = b->p->l->src;
	uint64_t tok[64];
	uint32_t k = 0;

	for (uint32_t j = 0; j < n; j++) {
		if (b->rc[idx[j]] != 0)
			continue;
		tok[k++] = b->tok[idx[j]];
		if (k == sizeof(tok) / sizeof(tok[0])) {
			src->ops->release(src, tok, k);
			k = 0;
		}
	}
	if (k)
		src->ops->release(src, tok, k);
}

void ckv_rbatch_drop(struct rbatch *b, uint32_t i)
{
	if (b->state[i] != RB_HELD)
		return;
	if (ckv_rbatch_complete(b)) {
		release_idx(b, &i, 1);
		b->state[i] = RB_DONE;
		b->unresolved--;
	} else {
		b->state[i] = RB_DROP;
	}
}

void ckv_rbatch_take(struct rbatch *b, uint32_t i)
{
	if (b->state[i] == RB_DONE)
		return;
	b->state[i] = RB_DONE;
	b->unresolved--;
}

static void rbatch_destroy(struct rbatch *b)
{
	if (b->n) {
		/* fin is set; the last completion may still be leaving mu */
		pthread_mutex_lock(&b->mu);
		pthread_mutex_unlock(&b->mu);
		pthread_cond_destroy(&b->cv);
		pthread_mutex_destroy(&b->mu);
	}
	free(b); /* the arrays are part of it */
}

struct rbatch *ckv_rbatch_sweep(struct rbatch *list)
{
	struct rbatch *keep = NULL, **tail = &keep;

	while (list) {
		struct rbatch *b = list;

		list = b->next;
		b->next = NULL;
		if (ckv_rbatch_complete(b)) {
			for (uint32_t i = 0; i < b->n; i++)
				if (b->state[i] == RB_DROP) {
					release_idx(b, &i, 1);
					b->state[i] = RB_DONE;
					b->unresolved--;
				}
			if (b->unresolved == 0) {
				rbatch_destroy(b);
				continue;
			}
		}
		*tail = b;
		tail = &b->next;
	}
	return keep;
}

void ckv_rbatch_free_all(struct rbatch *list)
{
	while (list) {
		struct rbatch *b = list;

		list = b->next;
		if (b->n && b->idle) { /* idle reads not started need not start */
			uint32_t *idx = malloc(sizeof(*idx) * b->n), k = 0;
			uint8_t *done = malloc(b->n);

			for (uint32_t i = 0; idx && done && i < b->n; i++)
				if (b->state[i] != RB_DONE)
					idx[k++] = i;
			if (idx && done && k)
				ckv_rbatch_withdraw(b, idx, k, done);
			free(idx);
			free(done);
		}
		if (b->n) {
			ckv_rbatch_wait(b);
			for (uint32_t i = 0; i < b->n; i++)
				if (b->state[i] != RB_DONE)
					release_idx(b, &i, 1);
		}
		rbatch_destroy(b);
	}
}

/* ---- release jobs -------------------------------------------------------- */

struct reljob *ckv_reljob_new(ckv_prefix *p, uint32_t max_tok, uint32_t max_tier)
{
	struct reljob *j = calloc(1, sizeof(*j) + sizeof(uint64_t) * max_tok +
					     sizeof(uint32_t) * 2 * (size_t)max_tier);

	if (!j)
		return NULL;
	j->p = p;
	j->tok = (uint64_t *)(j + 1);
	j->unpin = (uint32_t *)(j->tok + max_tok);
	j->fill = j->unpin + max_tier;
	return j;
}

static void reljob_fn(void *arg)
{
	struct reljob *j = arg;
	ckv_prefix *p = j->p;
	ckv_loader *l = p->l;

	if (j->ntok)
		l->src->ops->release(l->src, j->tok, j->ntok);
	for (uint32_t i = 0; i < j->nunpin; i++)
		ckv_tier_unpin(l->tier, j->unpin[i]);
	for (uint32_t i = 0; i < j->nfill; i++)
		ckv_tier_filled(l->tier, j->fill[i]);
	free(j);
	pthread_mutex_lock(&p->jobs_lock);
	if (--p->jobs == 0)
		pthread_cond_broadcast(&p->jobs_cv);
	pthread_mutex_unlock(&p->jobs_lock);
}

static void reljob_count(ckv_prefix *p, int d)
{
	pthread_mutex_lock(&p->jobs_lock);
	p->jobs += d;
	if (p->jobs == 0)
		pthread_cond_broadcast(&p->jobs_cv);
	pthread_mutex_unlock(&p->jobs_lock);
}

void ckv_reljob_run_synced(struct reljob *j, void *stream)
{
	ckv_backend *be = j->p->l->be;

	be->ops->sync(be, stream);
	ckv_reljob_run(j);
}

void ckv_reljob_submit(struct reljob *j, void *stream)
{
	ckv_backend *be = j->p->l->be;

	reljob_count(j->p, 1);
	if (be->ops->after(be, stream, reljob_fn, j) < 0) {
		be->ops->sync(be, stream);
		reljob_fn(j);
	}
}

int ckv_reljob_gather(struct reljob *j, const ckv_copy *cp, uint32_t n, uint64_t len, void *stream)
{
	ckv_backend *be = j->p->l->be;
	int rc;

	assert(j->nfill == 0); /* see loader_int.h: the job runs before the stores land */

	reljob_count(j->p, 1);
	rc = be->ops->gather_then(be, cp, n, len, stream, reljob_fn, j);
	if (rc < 0)
		reljob_count(j->p, -1);
	return rc;
}

void ckv_reljob_run(struct reljob *j)
{
	reljob_count(j->p, 1);
	reljob_fn(j);
}

int ckv_copy_dev(ckv_loader *l, const void *const *src, void *const *dst, uint32_t n,
		 uint64_t len, void *stream)
{
	if (n == 0)
		return 0;
	if (l->be->ops->gather_dev)
		return l->be->ops->gather_dev(l->be, src, dst, n, len, stream);
	if (l->kind != CKV_BACKEND_HOST)
		return -ENOTSUP;
	for (uint32_t i = 0; i < n; i++) /* host backend: its memory is host memory */
		memcpy(dst[i], src[i], len);
	return 0;
}

/* ---- fetch --------------------------------------------------------------- */

struct ckv_fetch {
	ckv_prefix *p;
	uint32_t layer, n;
	enum ckv_part part;
	uint64_t len;            /* bytes per chunk in dst */
	void *stream;
	uint32_t *chunks;        /* [n] */
	void **dst;              /* [n] */
	uint32_t *te;            /* [n] tier entry or CKV_TIER_NONE */
	void **tptr;             /* [n] tier memory of a hit (part offset applied) */
	uint32_t *bi;            /* [n] index in b, or UINT32_MAX */
	ckv_copy *cp;            /* [n] gather list (fetch_enqueue) */
	void **ts, **td;         /* [n] tier copy lists (fetch_enqueue) */
	struct rbatch *b;
	bool enqueued;           /* the copy is on the stream (or failed): rc holds the outcome */
	int rc;
	char *err;               /* rc's message when the start failed it (the wait says it again) */
};

static void fetch_free(struct ckv_fetch *f)
{
	free(f->err);
	free(f); /* the arrays are part of it */
}

/*
 * The start enqueued f's copy and it failed: keep the message, which later
 * calls on this thread may overwrite before the wait reports the error.
 */
static void fetch_keep_err(struct ckv_fetch *f)
{
	if (f->rc < 0 && !f->err)
		f->err = strdup(ckv_loader_error(f->p->l));
}

/* The backend refused a fetch's copy: say so; the job's pins go once the stream is idle. */
static void copy_failed(ckv_loader *l, struct reljob *j, void *stream, int rc)
{
	ckv_lerr(l, rc, "fetch: the %s backend's copy failed: %s", l->be->ops->name, strerror(-rc));
	ckv_reljob_run_synced(j, stream);
}

/*
 * Every read of f is in (or failed): check them, enqueue the copies on f's
 * stream and hand every pin to a release job. Frees f's batch; f itself
 * stays, with the outcome in f->rc.
 */
static int fetch_enqueue(ckv_fetch *f)
{
	ckv_prefix *p = f->p;
	ckv_loader *l = p->l;
	ckv_backend *be = l->be;
	const ckv_shape *sh = &p->shape;
	ckv_copy *cp = NULL;
	const void **ts = NULL;
	void **td = NULL;
	struct reljob *j = NULL;
	uint32_t ncp = 0, nts = 0;
	int rc = 0;

	if (f->b) {
		for (uint32_t i = 0; i < f->b->n && rc == 0; i++) {
			rc = ckv_rbatch_check(f->b, i);
			if (rc < 0)
				ckv_lerr(l, rc, "prefix %s layer %u chunk %u: %s", sh->hash, f->layer,
					 f->b->chunks[i],
					 rc == -EIO ? "read failed or checksum mismatch" : strerror(-rc));
		}
	}
	if (rc == 0 && f->n) {
		/* the copy lists live in the handle (allocated with it) */
		cp = f->cp;
		ts = (const void **)f->ts;
		td = f->td;
		j = ckv_reljob_new(p, f->n, f->n);
		if (!j)
			rc = ckv_lerr(l, -ENOMEM, "fetch: out of memory");
	}
	if (rc < 0) {
		/* nothing enqueued: drop the tier pins; the batch's pins go below */
		for (uint32_t i = 0; i < f->n; i++)
			if (f->te[i] != CKV_TIER_NONE)
				ckv_tier_unpin(l->tier, f->te[i]);
		goto out_free;
	}
	if (f->n == 0)
		goto out_free;

	/* from here on the job owns every pin: tier hits and arena chunks */
	for (uint32_t i = 0; i < f->n; i++) {
		if (f->te[i] != CKV_TIER_NONE) {
			ts[nts] = f->tptr[i];
			td[nts++] = f->dst[i];
			j->unpin[j->nunpin++] = f->te[i];
			continue;
		}
		cp[ncp].src = f->b->off[f->bi[i]];
		cp[ncp++].dst = f->dst[i];
		ckv_rbatch_take(f->b, f->bi[i]);
		j->tok[j->ntok++] = f->b->tok[f->bi[i]];
	}
	if (ncp && nts == 0 && !(l->tier && f->part == CKV_PART_KV)) {
		/* the gather is the fetch's only copy: the job follows it with no stream operation */
		rc = ckv_reljob_gather(j, cp, ncp, f->len, f->stream);
		if (rc == 0)
			j = NULL;
	} else {
		if (ncp)
			rc = be->ops->gather(be, cp, ncp, f->len, f->stream);
		if (rc == 0)
			rc = ckv_copy_dev(l, (const void *const *)ts, (void *const *)td, nts, f->len,
					  f->stream);
	}
	if (rc < 0) {
		copy_failed(l, j, f->stream, rc);
		j = NULL;
		goto out_free;
	}
	if (!j)
		goto out_free;
	/* whole chunks fetched from the arena: keep a copy in the GPU tier */
	if (l->tier && f->part == CKV_PART_KV) {
		nts = 0;
		for (uint32_t i = 0; i < f->n; i++) {
			ckv_tkey k;
			void *tp;
			uint32_t id;

			if (f->te[i] != CKV_TIER_NONE)
				continue;
			k = ckv_prefix_chunk_key(p, f->layer, f->chunks[i]);
			id = ckv_tier_reserve(l->tier, &k, sh->chunk_bytes, &tp);
			if (id == CKV_TIER_NONE)
				continue;
			ts[nts] = f->dst[i];
			td[nts++] = tp;
			j->fill[j->nfill++] = id;
		}
		if (nts && ckv_copy_dev(l, (const void *const *)ts, (void *const *)td, nts,
					sh->chunk_bytes, f->stream) < 0) {
			for (uint32_t i = 0; i < j->nfill; i++)
				ckv_tier_abort(l->tier, j->fill[i]);
			j->nfill = 0;
		}
	}
	ckv_reljob_submit(j, f->stream);
	j = NULL;

out_free:
	free(j);
	ckv_rbatch_free_all(f->b); /* releases whatever the job did not take */
	f->b = NULL;
	f->enqueued = true;
	f->rc = rc;
	return rc;
}

/*
 * The warm path, for a loader without a GPU tier whose source can: when
 * every chunk is in the arena the source pins the set in one pass, and the
 * gather goes on the stream at once with the job that releases the pins;
 * no read batch, no callbacks. Returns true with f enqueued (its outcome in
 * f->rc), or false with nothing pinned, when anything is not simply there
 * (a chunk not resident, the source refusing the set, no memory): the
 * general path then does the fetch and reports what is wrong.
 */
static bool fetch_warm(struct ckv_fetch *f, const uint32_t *chunks)
{
	enum { STACK = 256 };
	ckv_prefix *p = f->p;
	ckv_loader *l = p->l;
	ckv_source *src = l->src;
	enum ckv_source_part part = (enum ckv_source_part)f->part;
	uint64_t want = ckv_part_bytes(&p->shape, part);
	uint64_t stack[3 * STACK], *off = stack, *len, *tok;
	struct reljob *j = NULL;
	bool ok = false;

	if (f->n > STACK && !(off = malloc(3 * sizeof(*off) * f->n)))
		return false;
	len = off + f->n;
	tok = len + f->n;
	if (src->ops->pin_resident(src, p->pid, f->layer, part, chunks, f->n, off, len, tok) != 0)
		goto out; /* nothing pinned */
	for (uint32_t i = 0; i < f->n; i++) {
		if (!in_arena(src, off[i], len[i], want))
			goto out_release;
		f->cp[i].src = off[i];
		f->cp[i].dst = f->dst[i];
	}
	j = ckv_reljob_new(p, f->n, 0);
	if (!j)
		goto out_release;
	memcpy(j->tok, tok, sizeof(*tok) * f->n);
	j->ntok = f->n;
	count_reads(l, NULL, &p->shape, part, f->n, 0, 1);
	f->enqueued = true;
	f->rc = ckv_reljob_gather(j, f->cp, f->n, f->len, f->stream);
	if (f->rc < 0)
		copy_failed(l, j, f->stream, f->rc);
	ok = true;
	goto out;
out_release:
	src->ops->release(src, tok, f->n);
out:
	if (off != stack)
		free(off);
	return ok;
}

int ckv_fetch_start(ckv_prefix *p, uint32_t layer, const uint32_t *chunks, uint32_t n,
		    enum ckv_part part, void *dst, void *const *dst_ptrs, void *stream,
		    ckv_fetch **out)
{
	ckv_loader *l;
	const ckv_shape *sh;
	struct ckv_fetch *f;
	uint32_t *miss = NULL, nmiss = 0;
	int rc;

	if (!p || !out)
		return -EINVAL;
	l = p->l;
	sh = &p->shape;
	if (layer >= sh->layers)
		return ckv_lerr(l, -EINVAL, "fetch: layer %u, the prefix has %u layers", layer, sh->layers);
	if (part != CKV_PART_KV && part != CKV_PART_K && part != CKV_PART_V)
		return ckv_lerr(l, -EINVAL, "fetch: part %d: expected KV, K or V", (int)part);
	if (n && !chunks)
		return ckv_lerr(l, -EINVAL, "fetch: chunks is NULL");
	if (n && !dst && !dst_ptrs)
		return ckv_lerr(l, -EINVAL, "fetch: neither dst nor dst_ptrs given");
	if (part != CKV_PART_KV && sh->half_bytes % 16)
		return ckv_lerr(l, -ENOTSUP, "fetch: K/V halves of %llu bytes are not a multiple of 16",
				(unsigned long long)sh->half_bytes);
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= sh->chunks)
			return ckv_lerr(l, -EINVAL, "fetch: chunk %u, the prefix has %u chunks",
					chunks[i], sh->chunks);
	/* one allocation: the handle, its arrays (8-byte ones first) and the miss list */
	f = calloc(1, sizeof(*f) + (size_t)n * (sizeof(ckv_copy) + 4 * sizeof(void *) +
						 4 * sizeof(uint32_t)));
	if (!f)
		return ckv_lerr(l, -ENOMEM, "fetch: out of memory");
	f->p = p;
	f->layer = layer;
	f->n = n;
	f->part = part;
	f->len = part == CKV_PART_KV ? sh->chunk_bytes : sh->half_bytes;
	f->stream = stream;
	if (n) {
		f->cp = (ckv_copy *)(f + 1);
		f->dst = (void **)(f->cp + n);
		f->tptr = f->dst + n;
		f->ts = f->tptr + n;
		f->td = f->ts + n;
		f->chunks = (uint32_t *)(f->td + n);
		f->te = f->chunks + n;
		f->bi = f->te + n;
		miss = f->bi + n;
		memcpy(f->chunks, chunks, sizeof(*chunks) * n);
	}
	for (uint32_t i = 0; i < n; i++)
		f->dst[i] = dst_ptrs ? dst_ptrs[i] : (uint8_t *)dst + (size_t)i * f->len;
	if (n && !l->tier && l->src->ops->pin_resident && fetch_warm(f, chunks))
		goto started;
	for (uint32_t i = 0; i < n; i++) {
		f->te[i] = CKV_TIER_NONE;
		f->bi[i] = UINT32_MAX;
		if (l->tier) {
			ckv_tkey k = ckv_prefix_chunk_key(p, layer, chunks[i]);
			void *tp;

			f->te[i] = ckv_tier_lookup(l->tier, &k, sh->chunk_bytes, &tp);
			if (f->te[i] != CKV_TIER_NONE) {
				f->tptr[i] = (uint8_t *)tp + (part == CKV_PART_V ? sh->half_bytes : 0);
				atomic_fetch_add_explicit(&l->st.hits_gpu, 1, memory_order_relaxed);
				continue;
			}
		}
		f->bi[i] = nmiss;
		miss[nmiss++] = chunks[i];
	}
	if (nmiss) {
		rc = ckv_rbatch_issue(p, layer, (enum ckv_source_part)part, miss, nmiss, NULL, &f->b);
		if (rc < 0) {
			ckv_rbatch_free_all(f->b);
			for (uint32_t i = 0; i < n; i++)
				if (f->te[i] != CKV_TIER_NONE)
					ckv_tier_unpin(l->tier, f->te[i]);
			fetch_free(f);
			return rc;
		}
	}
	/*
	 * Everything already in the arena (or the GPU tier): the copy goes on
	 * the stream now, so its transfer overlaps whatever the caller does
	 * until the wait (the next layer's start, its compute).
	 */
	if (!f->b || ckv_rbatch_complete(f->b))
		fetch_enqueue(f);
started:
	fetch_keep_err(f);
	*out = f;
	return 0;
}

int ckv_fetch_wait(ckv_fetch *f)
{
	int rc;

	if (!f)
		return -EINVAL;
	if (!f->enqueued) {
		if (f->b)
			ckv_rbatch_wait(f->b);
		fetch_enqueue(f);
	}
	rc = f->rc;
	if (rc < 0 && f->err) /* failed at the start: its message again */
		ckv_lerr(f->p->l, rc, "%s", f->err);
	fetch_free(f);
	return rc;
}

int ckv_prefetch(ckv_prefix *p, uint32_t layer, const uint32_t *chunks, uint32_t n)
{
	ckv_loader *l;
	int rc;

	if (!p || (n && !chunks))
		return -EINVAL;
	l = p->l;
	if (layer >= p->shape.layers)
		return ckv_lerr(l, -EINVAL, "prefetch: layer %u, the prefix has %u layers", layer,
				p->shape.layers);
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= p->shape.chunks)
			return ckv_lerr(l, -EINVAL, "prefetch: chunk %u, the prefix has %u chunks",
					chunks[i], p->shape.chunks);
	if (n == 0 || !l->src->ops->prefetch)
		return 0;
	pthread_mutex_lock(&l->src_lock);
	l->src->err[0] = 0;
	rc = l->src->ops->prefetch(l->src, p->pid, layer, CKV_SRC_KV, chunks, n);
	if (rc < 0)
		ckv_lerr(l, rc, "prefetch: %s", l->src->err[0] ? l->src->err : strerror(-rc));
	pthread_mutex_unlock(&l->src_lock);
	return rc < 0 ? rc : 0;
}

int ckv_score_feedback(ckv_prefix *p, uint32_t layer, const uint32_t *chunks,
		       const float *scores, uint32_t n)
{
	ckv_loader *l;
	int rc;

	if (!p || (n && (!chunks || !scores)))
		return -EINVAL;
	l = p->l;
	if (layer >= p->shape.layers)
		return ckv_lerr(l, -EINVAL, "score feedback: layer %u, the prefix has %u layers", layer,
				p->shape.layers);
	for (uint32_t i = 0; i < n; i++) {
		if (chunks[i] >= p->shape.chunks)
			return ckv_lerr(l, -EINVAL, "score feedback: chunk %u, the prefix has %u chunks",
					chunks[i], p->shape.chunks);
		if (!isfinite(scores[i]))
			return ckv_lerr(l, -EINVAL, "score feedback: score %u is not finite", i);
	}
	if (n == 0)
		return 0;
	pthread_mutex_lock(&l->src_lock);
	l->src->err[0] = 0;
	rc = l->src->ops->score ? l->src->ops->score(l->src, p->pid, layer, chunks, scores, n) : 0;
	if (rc < 0)
		ckv_lerr(l, rc, "score feedback: %s", l->src->err[0] ? l->src->err : strerror(-rc));
	pthread_mutex_unlock(&l->src_lock);
	if (rc < 0)
		return rc;
	if (l->tier) {
		ckv_tkey *k = malloc(sizeof(*k) * n);

		if (!k)
			return ckv_lerr(l, -ENOMEM, "score feedback: out of memory");
		for (uint32_t i = 0; i < n; i++)
			k[i] = ckv_prefix_chunk_key(p, layer, chunks[i]);
		ckv_tier_score(l->tier, k, scores, n);
		free(k);
	}
	return 0;
}

/* Names of the pipeline's modes and scores, indexed by their enum values. */
static const char *const mode_names[] = {
	[CKV_MODE_FULL] = "full",
	[CKV_MODE_PERIOD] = "period",
	[CKV_MODE_LAYER] = "layer",
	[CKV_MODE_RERANK] = "rerank",
};
static const char *const score_names[] = {
	[CKV_SCORE_DIGEST] = "digest",
	[CKV_SCORE_KEYQ] = "keyq",
};

static const char *enum_name(const char *const *names, size_t n, int v)
{
	return v >= 0 && (size_t)v < n ? names[v] : "?";
}

/* The index of name in names[0..n), or -1. */
static int enum_parse(const char *const *names, size_t n, const char *name)
{
	for (size_t i = 0; name && i < n; i++)
		if (strcmp(name, names[i]) == 0)
			return (int)i;
	return -1;
}

const char *ckv_mode_name(ckv_mode m)
{
	return enum_name(mode_names, sizeof(mode_names) / sizeof(mode_names[0]), (int)m);
}

int ckv_mode_parse(const char *name, ckv_mode *out)
{
	int i = enum_parse(mode_names, sizeof(mode_names) / sizeof(mode_names[0]), name);

	if (i < 0)
		return -EINVAL;
	*out = (ckv_mode)i;
	return 0;
}

const char *ckv_score_name(ckv_score s)
{
	return enum_name(score_names, sizeof(score_names) / sizeof(score_names[0]), (int)s);
}

int ckv_score_parse(const char *name, ckv_score *out)
{
	int i = enum_parse(score_names, sizeof(score_names) / sizeof(score_names[0]), name);

	if (i < 0)
		return -EINVAL;
	*out = (ckv_score)i;
	return 0;
}
