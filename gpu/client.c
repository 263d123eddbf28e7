/*
 * client.c — ckv_source_remote (gpu/source.h): a ckvfs daemon over its
 * control socket (docs/PROTOCOL.md), the daemon's arena mapped read-only.
 *
 * Threads. Any thread may call the ops; each message is written whole under
 * send_lock. One receiver thread (rx_main) reads every reply: it wakes the
 * caller of a synchronous request (MATCH, OPEN, DIGESTS) and runs the
 * callbacks of GETs, so callbacks run on it. The connection is one stream:
 * a RELEASE or CLOSE written before a GET is seen by the daemon before it.
 *
 * Requests waiting for replies are kept in a hash table by id. A
 * synchronous one lives on its caller's stack and is only touched by the
 * receiver under r->lock until it is marked done. A GET (struct rreq with a
 * callback) belongs to the receiver once registered: it is freed after its
 * last chunk is reported, or when the connection dies (every chunk not yet
 * reported then completes with the error, -ECONNRESET usually).
 *
 * Locks: send_lock and lock are never held together. Callbacks run with
 * neither held, so they may call release.
 */
#include "source.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "ckv_ctl.h"
#include "ckv_ctl_msg.h"

#define RQ_BUCKETS 256u
#define HELLO_TIMEOUT_S 10
#define RX_CHUNK (256u << 10)

/* A request waiting for its reply. */
struct rreq {
	struct rreq *next;   /* r->tab chain; r->lock */
	uint32_t id;
	uint16_t reply_type; /* expected reply (CKV_CTL_COMPLETE for a GET) */

	/* synchronous requests: on the caller's stack; r->lock until done */
	bool done;
	int rc;
	uint8_t *reply;      /* the whole reply message, malloc'ed */
	float *dst;          /* DIGESTS: where the data goes */
	uint32_t dst_first, dst_count, dst_per;

	/* GET: owned by the receiver */
	ckv_source_cb cb;
	void *arg;
	uint32_t base;       /* index of chunks[0] of this message in the caller's list */
	uint32_t n, remaining;
	uint8_t *seen;       /* [n] */
};

/* A prefix this client holds open. */
struct rprefix {
	uint32_t handle;
	uint32_t layers, chunks;
	uint32_t per;        /* kv_heads * head_dim */
	uint64_t kq_chunk;   /* the most a chunk's key copy can take: kv_heads * c * head_dim * 4 / 8 */
	uint8_t *parts;      /* [layers]: parts fetched (1 << part), for SCORE */
};

struct remote {
	ckv_source src;      /* first: a ckv_source * is a struct remote * */
	int fd;
	pthread_t rx;
	bool rx_running;

	/* immutable after HELLO */
	uint16_t version;
	uint32_t max_msg, max_pins, max_prefixes, max_inflight;

	pthread_mutex_t send_lock; /* one message at a time on fd; protects sbuf */
	ckv_ctl_buf sbuf;

	pthread_mutex_t lock;      /* protects what follows */
	pthread_cond_t cv;         /* a synchronous reply came, a GET finished, the connection died */
	uint32_t next_id;
	struct rreq *tab[RQ_BUCKETS];
	int dead;                  /* 0, or the -errno the connection ended with */
	struct rprefix *pfx;
	uint32_t npfx, pfx_cap;
	uint64_t pins;             /* held, plus asked for by GETs in flight */
	uint32_t inflight;         /* GET messages in flight */
};

static struct remote *R(ckv_source *s)
{
	return (struct remote *)s;
}

/* ---- small helpers ----------------------------------------------------------- */

/* s->err; r->lock held or not yet shared. */
static void set_err_locked(struct remote *r, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void set_err_locked(struct remote *r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(r->src.err, sizeof(r->src.err), fmt, ap);
	va_end(ap);
}

static void set_err(struct remote *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(struct remote *r, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&r->lock);
	va_start(ap, fmt);
	vsnprintf(r->src.err, sizeof(r->src.err), fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&r->lock);
}

static struct rreq **bucket(struct remote *r, uint32_t id)
{
	return &r->tab[id % RQ_BUCKETS];
}

/* Register q under a fresh id. r->lock held. */
static void rq_add(struct remote *r, struct rreq *q)
{
	if (++r->next_id == 0)
		r->next_id = 1;
	q->id = r->next_id;
	q->next = *bucket(r, q->id);
	*bucket(r, q->id) = q;
}

/* Unlink and return the request with this id, or NULL. r->lock held. */
static struct rreq *rq_take(struct remote *r, uint32_t id)
{
	for (struct rreq **pp = bucket(r, id); *pp; pp = &(*pp)->next)
		if ((*pp)->id == id) {
			struct rreq *q = *pp;

			*pp = q->next;
			q->next = NULL;
			return q;
		}
	return NULL;
}

static struct rreq *rq_find(struct remote *r, uint32_t id)
{
	for (struct rreq *q = *bucket(r, id); q; q = q->next)
		if (q->id == id)
			return q;
	return NULL;
}

static struct rprefix *pfx_find(struct remote *r, uint32_t handle)
{
	for (uint32_t i = 0; i < r->npfx; i++)
		if (r->pfx[i].handle == handle)
			return &r->pfx[i];
	return NULL;
}

/* ---- sending ----------------------------------------------------------------- */

static int send_all(int fd, const uint8_t *p, size_t len)
{
	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* The stream is broken: make the receiver notice, fail everything. */
static void broken(struct remote *r, int rc)
{
	set_err(r, "control socket: send: %s", strerror(-rc));
	shutdown(r->fd, SHUT_RDWR);
}

/*
 * After sending with rc: a broken stream is shut down (the receiver then
 * fails everything) and reported as -ECONNRESET, the error every call gets
 * once the daemon is gone.
 */
static int sent(struct remote *r, int rc)
{
	if (rc >= 0 || rc == -ENOMEM)
		return rc;
	broken(r, rc);
	return -ECONNRESET;
}

/* Encode and send one message. send_lock held. */
static int send_locked(struct remote *r, ckv_ctl_msg *m)
{
	int rc;

	m->hdr.version = r->version;
	r->sbuf.len = 0;
	rc = ckv_ctl_encode(&r->sbuf, m);
	if (rc < 0)
		return rc;
	return send_all(r->fd, r->sbuf.p, r->sbuf.len);
}

static int send_msg(struct remote *r, ckv_ctl_msg *m)
{
	int rc;

	pthread_mutex_lock(&r->send_lock);
	rc = send_locked(r, m);
	pthread_mutex_unlock(&r->send_lock);
	return sent(r, rc);
}

/* An id for a one-way message. */
static uint32_t oneway_id(struct remote *r)
{
	uint32_t id;

	pthread_mutex_lock(&r->lock);
	if (++r->next_id == 0)
		r->next_id = 1;
	id = r->next_id;
	pthread_mutex_unlock(&r->lock);
	return id;
}

/*
 * A synchronous request: send m, wait for its reply (q->reply, malloc'ed,
 * the caller frees it) or ERROR (negative errno, text in s->err).
 */
static int call(struct remote *r, ckv_ctl_msg *m, struct rreq *q, uint16_t reply_type)
{
	int rc;

	q->reply_type = reply_type;
	pthread_mutex_lock(&r->lock);
	if (r->dead) {
		rc = r->dead;
		pthread_mutex_unlock(&r->lock);
		return rc;
	}
	rq_add(r, q);
	m->hdr.id = q->id;
	pthread_mutex_unlock(&r->lock);

	rc = send_msg(r, m);
	pthread_mutex_lock(&r->lock);
	if (rc < 0 && !q->done) {
		rq_take(r, q->id);
		q->done = true;
		q->rc = rc;
	}
	while (!q->done)
		pthread_cond_wait(&r->cv, &r->lock);
	pthread_mutex_unlock(&r->lock);
	return q->rc;
}

/* ---- the receiver ---------------------------------------------------------------- */

/* Report chunks of GET q not yet reported with rc. No lock held. */
static void get_fail(struct rreq *q, int rc)
{
	for (uint32_t i = 0; i < q->n; i++)
		if (!q->seen[i])
			q->cb(q->arg, q->base + i, 0, 0, 0, rc);
	free(q->seen);
	free(q);
}

/* The connection ended with rc: fail every request; later calls get rc. */
static void fail_all(struct remote *r, int rc)
{
	struct rreq *gets = NULL;

	pthread_mutex_lock(&r->lock);
	r->dead = rc;
	for (uint32_t b = 0; b < RQ_BUCKETS; b++) {
		struct rreq *q, *next;

		for (q = r->tab[b]; q; q = next) {
			next = q->next;
			if (q->cb) {
				r->pins -= q->remaining <= r->pins ? q->remaining : r->pins;
				q->next = gets;
				gets = q;
			} else {
				q->done = true;
				q->rc = rc;
			}
		}
		r->tab[b] = NULL;
	}
	r->inflight = 0;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->lock);
	while (gets) {
		struct rreq *q = gets;

		gets = q->next;
		get_fail(q, rc);
	}
}

static int on_complete(struct remote *r, const ckv_ctl_msg *m)
{
	uint32_t count = m->u.complete.count, bad = UINT32_MAX;
	bool finished = false;
	struct rreq *q;

	pthread_mutex_lock(&r->lock);
	q = rq_find(r, m->hdr.id);
	if (!q || !q->cb) {
		pthread_mutex_unlock(&r->lock);
		set_err(r, "control socket: COMPLETE for id %u, which is no GET in flight", m->hdr.id);
		return -EPROTO;
	}
	for (uint32_t i = 0; i < count && bad == UINT32_MAX; i++) {
		ckv_ctl_entry e;

		ckv_ctl_entry_load(m->u.complete.entries, i, &e);
		if (e.index >= q->n || q->seen[e.index] ||
		    (e.rc == 0 && (e.offset > r->src.arena_size ||
				   e.length > r->src.arena_size - e.offset)))
			bad = i;
		else
			q->seen[e.index] = 1;
	}
	if (bad != UINT32_MAX) {
		/* unmark: fail_all reports these chunks with the error */
		for (uint32_t i = 0; i < bad; i++) {
			ckv_ctl_entry e;

			ckv_ctl_entry_load(m->u.complete.entries, i, &e);
			q->seen[e.index] = 0;
		}
	} else {
		for (uint32_t i = 0; i < count; i++) {
			ckv_ctl_entry e;

			ckv_ctl_entry_load(m->u.complete.entries, i, &e);
			if (e.rc < 0 && r->pins)
				r->pins--;
		}
		q->remaining -= count;
	}
	if (bad == UINT32_MAX && q->remaining == 0) {
		rq_take(r, q->id);
		assert(r->inflight > 0);
		r->inflight--;
		finished = true;
		pthread_cond_broadcast(&r->cv);
	}
	pthread_mutex_unlock(&r->lock);
	if (bad != UINT32_MAX) {
		set_err(r, "control socket: COMPLETE id %u: entry %u names no pending chunk "
			   "or lies outside the arena", m->hdr.id, bad);
		return -EPROTO;
	}
	for (uint32_t i = 0; i < count; i++) {
		ckv_ctl_entry e;

		ckv_ctl_entry_load(m->u.complete.entries, i, &e);
		q->cb(q->arg, q->base + e.index, e.offset, e.length, e.token, e.rc);
	}
	if (finished) {
		free(q->seen);
		free(q);
	}
	return 0;
}

static int on_error(struct remote *r, const ckv_ctl_msg *m)
{
	int err = -m->u.error.err;
	const char *what = m->u.error.flags & CKV_CTL_ERR_FATAL ? "fatal: " : "";
	struct rreq *q;

	pthread_mutex_lock(&r->lock);
	set_err_locked(r, "ckvfs: %s%.*s", what, (int)m->u.error.text_len, m->u.error.text);
	q = m->hdr.id ? rq_take(r, m->hdr.id) : NULL;
	if (q && q->cb) {
		/* a GET the daemon refused: nothing of it was pinned */
		r->pins -= q->remaining <= r->pins ? q->remaining : r->pins;
		r->inflight--;
		pthread_cond_broadcast(&r->cv);
		pthread_mutex_unlock(&r->lock);
		get_fail(q, err);
		return 0;
	}
	if (q) {
		q->done = true;
		q->rc = err;
		pthread_cond_broadcast(&r->cv);
	}
	/* else the error of a one-way message: s->err says it */
	pthread_mutex_unlock(&r->lock);
	return 0;
}

/* MATCH_OK, OPEN_OK, DIGESTS_OK, KEYQ_OK, STATS_OK: wake the caller. */
static int on_reply(struct remote *r, const ckv_ctl_msg *m, const uint8_t *raw, size_t len)
{
	char tn[16];
	struct rreq *q;
	int rc = 0;

	pthread_mutex_lock(&r->lock);
	q = rq_find(r, m->hdr.id);
	if (!q || q->cb || q->reply_type != m->hdr.type) {
		pthread_mutex_unlock(&r->lock);
		set_err(r, "control socket: unexpected %s for id %u", ckv_ctl_type_name(m->hdr.type, tn),
			m->hdr.id);
		return -EPROTO;
	}
	rq_take(r, q->id);
	if (q->dst) {
		if (m->u.digests_ok.first != q->dst_first || m->u.digests_ok.count != q->dst_count ||
		    m->u.digests_ok.per != q->dst_per)
			rc = -EPROTO;
		else
			memcpy(q->dst, m->u.digests_ok.data,
			       sizeof(float) * (size_t)q->dst_count * q->dst_per);
	} else {
		q->reply = malloc(len);
		if (q->reply)
			memcpy(q->reply, raw, len);
		else
			rc = -ENOMEM;
	}
	q->rc = rc;
	q->done = true;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->lock);
	return 0;
}

static int dispatch(struct remote *r, const ckv_ctl_msg *m, const uint8_t *raw, size_t len)
{
	char tn[16];

	if (m->hdr.version != r->version) {
		set_err(r, "control socket: reply with header version %u, the connection speaks %u",
			m->hdr.version, r->version);
		return -EPROTO;
	}
	switch (m->hdr.type) {
	case CKV_CTL_COMPLETE: return on_complete(r, m);
	case CKV_CTL_ERROR: return on_error(r, m);
	case CKV_CTL_MATCH_OK:
	case CKV_CTL_OPEN_OK:
	case CKV_CTL_DIGESTS_OK:
	case CKV_CTL_KEYQ_OK:
	case CKV_CTL_STATS_OK: return on_reply(r, m, raw, len);
	default:
		set_err(r, "control socket: unexpected %s from the daemon",
			ckv_ctl_type_name(m->hdr.type, tn));
		return -EPROTO;
	}
}

static void *rx_main(void *arg)
{
	struct remote *r = arg;
	uint8_t *buf = NULL;
	size_t len = 0, cap = 0;
	int rc = 0;

	for (;;) {
		size_t want = RX_CHUNK, off = 0;
		ssize_t n;

		if (len >= CKV_CTL_HDR) { /* room for the whole message in progress */
			size_t whole = CKV_CTL_HDR + (size_t)ckv_ctl_u32(buf + 8, 0);

			if (whole > len && whole - len > want)
				want = whole - len;
		}
		if (cap - len < want) {
			uint8_t *p = realloc(buf, len + want);

			if (!p) {
				rc = -ENOMEM;
				break;
			}
			buf = p;
			cap = len + want;
		}
		n = recv(r->fd, buf + len, cap - len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = n == 0 ? -ECONNRESET : -errno;
			break;
		}
		len += (size_t)n;
		for (;;) {
			char err[256];
			ckv_ctl_msg m;
			int k = ckv_ctl_parse(buf + off, len - off, &m, err, sizeof(err));

			if (k == 0)
				break;
			if (k < 0) {
				set_err(r, "control socket: malformed message from the daemon: %s", err);
				rc = -EPROTO;
				goto out;
			}
			rc = dispatch(r, &m, buf + off, (size_t)k);
			if (rc < 0)
				goto out;
			off += (size_t)k;
		}
		memmove(buf, buf + off, len - off);
		len -= off;
		if (!len && cap > 4 * RX_CHUNK) {
			free(buf);
			buf = NULL;
			cap = 0;
		}
	}
out:
	shutdown(r->fd, SHUT_RDWR);
	free(buf);
	fail_all(r, rc == -EPROTO ? -EPROTO : -ECONNRESET);
	return NULL;
}

/* ---- ops ------------------------------------------------------------------------- */

static int r_match(ckv_source *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		   ckv_hash *h, uint32_t *matched)
{
	struct remote *r = R(s);
	ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_MATCH } }, rep;
	struct rreq q = { 0 };
	char err[256];
	int rc;

	if (!g || (n && !tokens) || !h || !matched)
		return -EINVAL;
	m.u.match.layers = g->layers;
	m.u.match.kv_heads = g->kv_heads;
	m.u.match.head_dim = g->head_dim;
	m.u.match.chunk_tokens = g->chunk_tokens;
	m.u.match.dtype = (uint32_t)g->dtype;
	m.u.match.model = g->model;
	m.u.match.model_len = (uint16_t)strnlen(g->model, sizeof(g->model));
	m.u.match.salt = g->salt;
	m.u.match.salt_len = (uint16_t)strnlen(g->salt, sizeof(g->salt));
	m.u.match.ntokens = n;
	m.u.match.tokens = tokens;
	if (m.u.match.model_len < 1 || m.u.match.model_len > CKV_CTL_MAX_MODEL ||
	    m.u.match.salt_len > CKV_CTL_MAX_SALT || g->dtype < CKV_DTYPE_BF16 ||
	    g->dtype > CKV_DTYPE_FP32) {
		set_err(r, "match: invalid geometry (model, salt or dtype)");
		return -EINVAL;
	}
	if (ckv_ctl_payload_size(&m) > r->max_msg) {
		set_err(r, "match: %u tokens do not fit the daemon's %u-byte messages", n, r->max_msg);
		return -E2BIG;
	}
	rc = call(r, &m, &q, CKV_CTL_MATCH_OK);
	if (rc < 0)
		goto out;
	if (ckv_ctl_parse(q.reply, CKV_CTL_HDR + ckv_ctl_u32(q.reply + 8, 0), &rep, err,
			  sizeof(err)) <= 0) {
		rc = -EPROTO;
		goto out;
	}
	memcpy(h->b, rep.u.match_ok.hash, 16);
	*matched = rep.u.match_ok.matched > n ? n : rep.u.match_ok.matched;
out:
	free(q.reply);
	return rc;
}

/* The manifest fields of an OPEN_OK, checked against the geometry they imply. */
static int manifest_from(struct remote *r, const ckv_ctl_msg *o, ckv_manifest **out)
{
	ckv_manifest *mf = calloc(1, sizeof(*mf));
	ckv_geom *g;
	ckv_err e = { { 0 } };
	int rc;

	if (!mf)
		return -ENOMEM;
	g = &mf->geom;
	memcpy(g->model, o->u.open_ok.model, o->u.open_ok.model_len);
	memcpy(g->salt, o->u.open_ok.salt, o->u.open_ok.salt_len);
	g->dtype = (ckv_dtype)o->u.open_ok.dtype;
	g->layers = o->u.open_ok.layers;
	g->kv_heads = o->u.open_ok.kv_heads;
	g->head_dim = o->u.open_ok.head_dim;
	g->chunk_tokens = o->u.open_ok.chunk_tokens;
	rc = ckv_geom_init(g, &e);
	if (rc < 0) {
		set_err(r, "open: the daemon sent an invalid geometry: %s", e.msg);
		goto out_free;
	}
	if (g->chunk_bytes != o->u.open_ok.chunk_bytes || g->half_bytes != o->u.open_ok.half_bytes ||
	    g->seed != o->u.open_ok.seed || o->u.open_ok.tokens == 0 ||
	    o->u.open_ok.chunks != ckv_chunks_for(o->u.open_ok.tokens, g->chunk_tokens)) {
		set_err(r, "open: the daemon's sizes do not match its geometry");
		rc = -EPROTO;
		goto out_free;
	}
	mf->tokens = o->u.open_ok.tokens;
	mf->chunks = o->u.open_ok.chunks;
	memcpy(mf->hash.b, o->u.open_ok.hash, 16);
	mf->created = o->u.open_ok.created;
	*out = mf;
	return 0;

out_free:
	free(mf);
	return rc < 0 ? rc : -EPROTO;
}

static void send_close(struct remote *r, uint32_t handle)
{
	ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_CLOSE, .id = oneway_id(r) } };

	m.u.close.handle = handle;
	send_msg(r, &m);
}

static int r_open(ckv_source *s, const ckv_hash *h, ckv_manifest **mout, uint32_t *pid)
{
	struct remote *r = R(s);
	ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_OPEN } }, rep;
	struct rreq q = { 0 };
	ckv_manifest *mf = NULL;
	struct rprefix *p;
	char err[256];
	int rc;

	if (!h || !mout || !pid)
		return -EINVAL;
	pthread_mutex_lock(&r->lock);
	if (r->npfx >= r->max_prefixes) {
		set_err_locked(r, "open: %u prefixes open, the daemon allows %u", r->npfx,
			       r->max_prefixes);
		pthread_mutex_unlock(&r->lock);
		return -EMFILE;
	}
	pthread_mutex_unlock(&r->lock);
	memcpy(m.u.open.hash, h->b, 16);
	rc = call(r, &m, &q, CKV_CTL_OPEN_OK);
	if (rc < 0)
		goto out;
	if (ckv_ctl_parse(q.reply, CKV_CTL_HDR + ckv_ctl_u32(q.reply + 8, 0), &rep, err,
			  sizeof(err)) <= 0) {
		rc = -EPROTO;
		goto out;
	}
	rc = manifest_from(r, &rep, &mf);
	if (rc < 0)
		goto out_close;

	pthread_mutex_lock(&r->lock);
	if (r->npfx == r->pfx_cap) {
		uint32_t ncap = r->pfx_cap ? r->pfx_cap * 2 : 8;
		struct rprefix *np = realloc(r->pfx, sizeof(*np) * ncap);

		if (!np) {
			pthread_mutex_unlock(&r->lock);
			rc = -ENOMEM;
			goto out_close;
		}
		r->pfx = np;
		r->pfx_cap = ncap;
	}
	p = &r->pfx[r->npfx];
	p->parts = calloc(mf->geom.layers, 1);
	if (!p->parts) {
		pthread_mutex_unlock(&r->lock);
		rc = -ENOMEM;
		goto out_close;
	}
	p->handle = rep.u.open_ok.handle;
	p->layers = mf->geom.layers;
	p->chunks = mf->chunks;
	p->per = mf->geom.kv_heads * mf->geom.head_dim;
	p->kq_chunk = ckv_keyq_chunk_bytes(&mf->geom, 4);
	r->npfx++;
	pthread_mutex_unlock(&r->lock);
	*mout = mf;
	*pid = rep.u.open_ok.handle;
	free(q.reply);
	return 0;

out_close:
	send_close(r, rep.u.open_ok.handle);
	free(mf);
out:
	free(q.reply);
	return rc;
}

static void r_close(ckv_source *s, uint32_t pid)
{
	struct remote *r = R(s);
	struct rprefix *p;

	pthread_mutex_lock(&r->lock);
	p = pfx_find(r, pid);
	if (!p) {
		pthread_mutex_unlock(&r->lock);
		return;
	}
	free(p->parts);
	*p = r->pfx[--r->npfx];
	pthread_mutex_unlock(&r->lock);
	send_close(r, pid);
}

/*
 * Check pid, layer and chunks of a request against the open prefix;
 * *per_out gets its kv_heads * head_dim, *chunks_out its chunk count.
 */
static int check_target(struct remote *r, const char *what, uint32_t pid, uint32_t layer,
			const uint32_t *chunks, uint32_t n, uint32_t *per_out, uint32_t *chunks_out)
{
	struct rprefix *p;
	uint32_t m, layers, per;

	pthread_mutex_lock(&r->lock);
	p = pfx_find(r, pid);
	if (!p) {
		set_err_locked(r, "%s: prefix handle 0x%x is not open", what, pid);
		pthread_mutex_unlock(&r->lock);
		return -EBADF;
	}
	m = p->chunks;
	layers = p->layers;
	per = p->per;
	pthread_mutex_unlock(&r->lock);
	if (layer >= layers) {
		set_err(r, "%s: layer %u, the prefix has %u", what, layer, layers);
		return -EINVAL;
	}
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= m) {
			set_err(r, "%s: chunks[%u] = %u, the prefix has %u chunks", what, i, chunks[i], m);
			return -EINVAL;
		}
	if (per_out)
		*per_out = per;
	if (chunks_out)
		*chunks_out = m;
	return 0;
}

static int r_get(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		 const uint32_t *chunks, uint32_t n, ckv_source_cb cb, void *arg)
{
	struct remote *r = R(s);
	uint32_t per_msg = (r->max_msg - 16) / 4, k, i;
	struct rreq **subs;
	struct rprefix *p;
	int rc;

	if (!cb || (n && !chunks) || (unsigned)part > CKV_SRC_V)
		return -EINVAL;
	if (n == 0)
		return 0;
	rc = check_target(r, "get", pid, layer, chunks, n, NULL, NULL);
	if (rc < 0)
		return rc;
	k = (n + per_msg - 1) / per_msg;
	if (k > r->max_inflight) {
		set_err(r, "get: %u chunks need %u messages, more than the %u GETs allowed in flight", n,
			k, r->max_inflight);
		return -E2BIG;
	}
	subs = calloc(k, sizeof(*subs));
	if (!subs)
		return -ENOMEM;
	for (i = 0; i < k; i++) {
		uint32_t cnt = n - i * per_msg < per_msg ? n - i * per_msg : per_msg;

		subs[i] = calloc(1, sizeof(**subs));
		if (!subs[i] || !(subs[i]->seen = calloc(cnt, 1))) {
			rc = -ENOMEM;
			goto out_free;
		}
		subs[i]->reply_type = CKV_CTL_COMPLETE;
		subs[i]->cb = cb;
		subs[i]->arg = arg;
		subs[i]->base = i * per_msg;
		subs[i]->n = subs[i]->remaining = cnt;
	}

	pthread_mutex_lock(&r->lock);
	while (!r->dead && r->inflight + k > r->max_inflight) {
		if (r->rx_running && pthread_equal(pthread_self(), r->rx)) {
			set_err_locked(r, "get: %u GETs in flight (the limit) and called from a callback",
				       r->inflight);
			rc = -EAGAIN;
			goto out_unlock;
		}
		pthread_cond_wait(&r->cv, &r->lock);
	}
	if (r->dead) {
		rc = r->dead;
		goto out_unlock;
	}
	if (r->pins + n > r->max_pins) {
		set_err_locked(r, "get: %u chunks on top of %llu pins exceed the daemon's limit of %u", n,
			       (unsigned long long)r->pins, r->max_pins);
		rc = -ENOBUFS;
		goto out_unlock;
	}
	/* The prefix may have been closed meanwhile by another thread. */
	p = pfx_find(r, pid);
	if (!p) {
		rc = -EBADF;
		goto out_unlock;
	}
	p->parts[layer] |= (uint8_t)(1u << part);
	r->pins += n;
	r->inflight += k;
	for (i = 0; i < k; i++)
		rq_add(r, subs[i]);
	pthread_mutex_unlock(&r->lock);

	/*
	 * Registered: from here every chunk gets its callback, from the
	 * COMPLETEs or, if the stream breaks, from fail_all.
	 */
	pthread_mutex_lock(&r->send_lock);
	for (i = 0, rc = 0; i < k && rc == 0; i++) {
		ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_GET, .id = subs[i]->id } };

		m.u.get.handle = pid;
		m.u.get.layer = layer;
		m.u.get.part = (uint16_t)part;
		m.u.get.n = subs[i]->n;
		m.u.get.chunks = chunks + subs[i]->base;
		rc = send_locked(r, &m);
	}
	pthread_mutex_unlock(&r->send_lock);
	sent(r, rc);
	free(subs);
	return 0;

out_unlock:
	pthread_mutex_unlock(&r->lock);
out_free:
	for (i = 0; i < k; i++)
		if (subs[i]) {
			free(subs[i]->seen);
			free(subs[i]);
		}
	free(subs);
	return rc;
}

static void r_release(ckv_source *s, const uint64_t *tokens, uint32_t n)
{
	struct remote *r = R(s);
	uint32_t per_msg = (r->max_msg - 8) / 8;
	int rc = 0;

	if (!n || !tokens)
		return;
	pthread_mutex_lock(&r->lock);
	r->pins -= n <= r->pins ? n : r->pins;
	rc = r->dead;
	pthread_mutex_unlock(&r->lock);
	if (rc)
		return; /* the daemon dropped every pin of this connection already */
	pthread_mutex_lock(&r->send_lock);
	for (uint32_t i = 0; i < n && rc == 0; i += per_msg) {
		ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_RELEASE, .id = oneway_id(r) } };

		m.u.release.n = n - i < per_msg ? n - i : per_msg;
		m.u.release.tokens = tokens + i;
		rc = send_locked(r, &m);
	}
	pthread_mutex_unlock(&r->send_lock);
	sent(r, rc);
}

static int r_prefetch(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		      const uint32_t *chunks, uint32_t n)
{
	struct remote *r = R(s);
	uint32_t per_msg = (r->max_msg - 16) / 4;
	int rc;

	if ((n && !chunks) || (unsigned)part > CKV_SRC_V)
		return -EINVAL;
	if (n == 0)
		return 0;
	rc = check_target(r, "prefetch", pid, layer, chunks, n, NULL, NULL);
	if (rc < 0)
		return rc;
	pthread_mutex_lock(&r->lock);
	rc = r->dead;
	pthread_mutex_unlock(&r->lock);
	if (rc)
		return rc;
	pthread_mutex_lock(&r->send_lock);
	for (uint32_t i = 0; i < n && rc == 0; i += per_msg) {
		ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_PREFETCH, .id = oneway_id(r) } };

		m.u.get.handle = pid;
		m.u.get.layer = layer;
		m.u.get.part = (uint16_t)part;
		m.u.get.n = n - i < per_msg ? n - i : per_msg;
		m.u.get.chunks = chunks + i;
		rc = send_locked(r, &m);
	}
	pthread_mutex_unlock(&r->send_lock);
	return sent(r, rc);
}

static int r_score(ckv_source *s, uint32_t pid, uint32_t layer, const uint32_t *chunks,
		   const float *scores, uint32_t n)
{
	struct remote *r = R(s);
	uint32_t per_msg = (r->max_msg - 16) / 8;
	struct rprefix *p;
	uint16_t parts;
	int rc;

	if (n && (!chunks || !scores))
		return -EINVAL;
	if (n == 0)
		return 0;
	rc = check_target(r, "score", pid, layer, chunks, n, NULL, NULL);
	if (rc < 0)
		return rc;
	for (uint32_t i = 0; i < n; i++)
		if (!isfinite(scores[i])) {
			set_err(r, "score: scores[%u] is not finite", i);
			return -EINVAL;
		}
	pthread_mutex_lock(&r->lock);
	p = pfx_find(r, pid);
	parts = p && p->parts[layer] ? p->parts[layer] : 1u << CKV_SRC_KV;
	rc = r->dead;
	pthread_mutex_unlock(&r->lock);
	if (rc)
		return rc;
	pthread_mutex_lock(&r->send_lock);
	for (uint32_t i = 0; i < n && rc == 0; i += per_msg) {
		ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_SCORE, .id = oneway_id(r) } };
		uint32_t cnt = n - i < per_msg ? n - i : per_msg;

		m.u.score.handle = pid;
		m.u.score.layer = layer;
		m.u.score.parts = parts;
		m.u.score.n = cnt;
		m.u.score.chunks = chunks + i;
		m.u.score.scores = scores + i;
		rc = send_locked(r, &m);
	}
	pthread_mutex_unlock(&r->send_lock);
	return sent(r, rc);
}

static int r_digests(ckv_source *s, uint32_t pid, uint32_t layer, float *out)
{
	struct remote *r = R(s);
	uint32_t per, m, step;
	int rc;

	if (!out)
		return -EINVAL;
	rc = check_target(r, "digests", pid, layer, NULL, 0, &per, &m);
	if (rc < 0)
		return rc;
	step = (uint32_t)((r->max_msg - 16) / (4ull * per));
	if (step == 0) {
		set_err(r, "digests: one chunk's digest (%u floats) does not fit a message", per);
		return -E2BIG;
	}
	for (uint32_t first = 0; first < m && rc == 0; first += step) {
		ckv_ctl_msg msg = { .hdr = { .type = CKV_CTL_DIGESTS } };
		struct rreq q = { 0 };

		msg.u.digests.handle = pid;
		msg.u.digests.layer = layer;
		msg.u.digests.first = first;
		msg.u.digests.count = m - first < step ? m - first : step;
		q.dst = out + (size_t)first * per;
		q.dst_first = first;
		q.dst_count = msg.u.digests.count;
		q.dst_per = per;
		rc = call(r, &msg, &q, CKV_CTL_DIGESTS_OK);
		if (rc == -EPROTO)
			set_err(r, "digests: the daemon answered another range or size");
	}
	return rc;
}

/*
 * KEYQ (protocol version 2): the layer's key copy in runs of chunks that fit
 * a message, the parts of every reply appended (a segment cut by two runs
 * gives two parts with the same scales).
 */
static int r_keyq_r(ckv_source *s, uint32_t pid, uint32_t layer, struct ckv_keyq *out, char *err,
		    size_t errlen)
{
	struct remote *r = R(s);
	uint32_t hd, m, step, cap = 0;
	uint64_t kqc = 0;
	int rc;

	memset(out, 0, sizeof(*out));
	err[0] = 0;
	if (r->version < CKV_CTL_VERSION_KEYQ) {
		snprintf(err, errlen,
			 "the daemon speaks control protocol %u; key copies need version %u (a newer ckvfs)",
			 r->version, CKV_CTL_VERSION_KEYQ);
		return -ENOTSUP;
	}
	rc = check_target(r, "keyq", pid, layer, NULL, 0, &hd, &m);
	if (rc == 0) {
		const struct rprefix *p;

		pthread_mutex_lock(&r->lock);
		p = pfx_find(r, pid);
		kqc = p ? p->kq_chunk : 0;
		pthread_mutex_unlock(&r->lock);
	}
	/* worst case per chunk: its codes at 4 bits, one part with its scales */
	step = rc == 0 ? (uint32_t)((r->max_msg - CKV_CTL_HDR - 20) / (kqc + 4 + 4ull * hd)) : 0;
	if (rc == 0 && step == 0) {
		snprintf(err, errlen, "keyq: one chunk's key copy does not fit a %u-byte message", r->max_msg);
		rc = -E2BIG;
	}
	for (uint32_t first = 0; rc == 0 && first < m; first += step) {
		ckv_ctl_msg msg = { .hdr = { .type = CKV_CTL_KEYQ } }, rep;
		struct rreq q = { 0 };
		uint32_t cnt = m - first < step ? m - first : step;
		char perr_[256];

		msg.u.keyq.handle = pid;
		msg.u.keyq.layer = layer;
		msg.u.keyq.first = first;
		msg.u.keyq.count = cnt;
		rc = call(r, &msg, &q, CKV_CTL_KEYQ_OK);
		if (rc < 0)
			break;
		if (ckv_ctl_parse(q.reply, CKV_CTL_HDR + ckv_ctl_u32(q.reply + 8, 0), &rep, perr_,
				  sizeof(perr_)) <= 0 ||
		    rep.u.keyq_ok.first != first || rep.u.keyq_ok.count != cnt || rep.u.keyq_ok.hd != hd ||
		    (out->codes && (rep.u.keyq_ok.bits != out->bits || rep.u.keyq_ok.per != out->per))) {
			snprintf(err, errlen, "keyq: the daemon answered another range, shape or width");
			free(q.reply);
			rc = -EPROTO;
			break;
		}
		if (!out->codes) {
			out->bits = rep.u.keyq_ok.bits;
			out->per = rep.u.keyq_ok.per;
			out->codes = malloc(out->per * m);
			if (!out->codes) {
				free(q.reply);
				rc = -ENOMEM;
				break;
			}
		}
		if (out->nparts + rep.u.keyq_ok.nparts + 1u > cap) {
			uint32_t nc = (out->nparts + rep.u.keyq_ok.nparts + 1) * 2;
			uint32_t *nf = realloc(out->first, sizeof(*nf) * nc);
			uint16_t *ns = nf ? realloc(out->scales, sizeof(*ns) * 2ull * hd * nc) : NULL;

			if (nf)
				out->first = nf;
			if (ns)
				out->scales = ns;
			if (!nf || !ns) {
				free(q.reply);
				rc = -ENOMEM;
				break;
			}
			cap = nc;
		}
		for (uint32_t i = 0; i < rep.u.keyq_ok.nparts; i++)
			out->first[out->nparts + i] = ckv_ctl_u32(rep.u.keyq_ok.starts, i);
		memcpy(out->scales + 2ull * hd * out->nparts, rep.u.keyq_ok.scales,
		       4ull * hd * rep.u.keyq_ok.nparts); /* bf16 little-endian, like the host */
		memcpy(out->codes + (uint64_t)first * out->per, rep.u.keyq_ok.codes, (uint64_t)cnt * out->per);
		out->nparts += rep.u.keyq_ok.nparts;
		out->first[out->nparts] = first + cnt;
		free(q.reply);
	}
	if (rc < 0) {
		if (!err[0]) {
			pthread_mutex_lock(&r->lock);
			snprintf(err, errlen, "%s", r->src.err[0] ? r->src.err : strerror(-rc));
			pthread_mutex_unlock(&r->lock);
		}
		ckv_keyq_free(out);
	}
	return rc;
}

static void r_destroy(ckv_source *s)
{
	struct remote *r = R(s);

	if (!s)
		return;
	shutdown(r->fd, SHUT_RDWR); /* the daemon releases everything this connection held */
	if (r->rx_running)
		pthread_join(r->rx, NULL);
	close(r->fd);
	if (r->src.arena)
		munmap(r->src.arena, r->src.arena_size);
	for (uint32_t i = 0; i < r->npfx; i++)
		free(r->pfx[i].parts);
	free(r->pfx);
	ckv_ctl_buf_free(&r->sbuf);
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->lock);
	pthread_mutex_destroy(&r->send_lock);
	free(r);
}

static const struct ckv_source_ops remote_ops = {
	.match = r_match,
	.open = r_open,
	.close = r_close,
	.get = r_get,
	.release = r_release,
	.prefetch = r_prefetch,
	.score = r_score,
	.digests = r_digests,
	.destroy = r_destroy,
	.keyq_r = r_keyq_r,
};

/* ---- connect -------------------------------------------------------------------- */

/* Read exactly len bytes; keep a descriptor that comes along in *fd_out (others closed). */
static int recv_exact(int fd, uint8_t *p, size_t len, int *fd_out)
{
	while (len) {
		char cbuf[CMSG_SPACE(sizeof(int) * 4)];
		struct iovec iov = { .iov_base = p, .iov_len = len };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
				     .msg_controllen = sizeof(cbuf) };
		ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			for (size_t k = 0; k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
				int got;

				memcpy(&got, CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
				if (*fd_out < 0)
					*fd_out = got;
				else
					close(got);
			}
		}
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int hello(struct remote *r, const char *sock, ckv_err *e)
{
	uint16_t versions[] = { htole16(CKV_CTL_VERSION), htole16(CKV_CTL_VERSION_MIN) };
	ckv_ctl_msg m = { .hdr = { .version = CKV_CTL_VERSION_MIN, .type = CKV_CTL_HELLO, .id = 1 } };
	struct timeval tv = { .tv_sec = HELLO_TIMEOUT_S };
	uint8_t buf[CKV_CTL_HDR + 2048];
	char err[256];
	struct stat st;
	void *map;
	int afd = -1, rc;

	m.u.hello.nversions = 2;
	m.u.hello.versions = versions;
	setsockopt(r->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	r->version = CKV_CTL_VERSION_MIN;
	rc = send_msg(r, &m);
	if (rc < 0)
		return ckv_errf(e, rc, "%s: sending HELLO: %s", sock, strerror(-rc));
	rc = recv_exact(r->fd, buf, CKV_CTL_HDR, &afd);
	if (rc == 0) {
		rc = ckv_ctl_parse(buf, CKV_CTL_HDR, &m, err, sizeof(err));
		if (rc == 0 && m.hdr.length > sizeof(buf) - CKV_CTL_HDR)
			rc = -EMSGSIZE;
		if (rc == 0)
			rc = recv_exact(r->fd, buf + CKV_CTL_HDR, m.hdr.length, &afd);
		if (rc == 0 && ckv_ctl_parse(buf, CKV_CTL_HDR + m.hdr.length, &m, err, sizeof(err)) <= 0)
			rc = -EPROTO;
	}
	if (rc < 0) {
		rc = ckv_errf(e, rc == -EAGAIN ? -ETIMEDOUT : rc, "%s: no HELLO_OK from the daemon: %s",
			      sock, rc == -EPROTO || rc == -EMSGSIZE ? err : strerror(-rc));
		goto out_close;
	}
	if (m.hdr.type == CKV_CTL_ERROR) {
		rc = ckv_errf(e, -m.u.error.err, "%s: the daemon refused: %.*s", sock,
			      (int)m.u.error.text_len, m.u.error.text);
		goto out_close;
	}
	if (m.hdr.type != CKV_CTL_HELLO_OK || m.u.hello_ok.version < CKV_CTL_VERSION_MIN ||
	    m.u.hello_ok.version > CKV_CTL_VERSION ||
	    !(m.u.hello_ok.flags & CKV_CTL_HELLO_ARENA_FD) || afd < 0 || !m.u.hello_ok.arena_size ||
	    !m.u.hello_ok.max_pins || !m.u.hello_ok.max_prefixes || !m.u.hello_ok.max_inflight) {
		rc = ckv_errf(e, -EPROTO, "%s: not a ckvfs HELLO_OK (or no arena descriptor)", sock);
		goto out_close;
	}
	if (fstat(afd, &st) < 0 || (uint64_t)st.st_size < m.u.hello_ok.arena_size) {
		rc = ckv_errf(e, -EPROTO, "%s: the arena descriptor is smaller than the arena", sock);
		goto out_close;
	}
	map = mmap(NULL, m.u.hello_ok.arena_size, PROT_READ, MAP_SHARED, afd, 0);
	if (map == MAP_FAILED) {
		rc = ckv_errf(e, -errno, "%s: mmap of the arena: %s", sock, strerror(errno));
		goto out_close;
	}
	r->src.arena = map;
	r->src.arena_size = m.u.hello_ok.arena_size;
	r->src.arena_readonly = true;
	r->version = m.u.hello_ok.version;
	r->max_msg = m.u.hello_ok.max_msg;
	r->max_pins = m.u.hello_ok.max_pins;
	r->max_prefixes = m.u.hello_ok.max_prefixes;
	r->max_inflight = m.u.hello_ok.max_inflight;
	tv.tv_sec = 0;
	setsockopt(r->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	rc = 0;
out_close:
	if (afd >= 0)
		close(afd); /* the mapping keeps the arena */
	return rc;
}

int ckv_source_remote(const char *path, ckv_source **out, ckv_err *e)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char sock[PATH_MAX];
	struct remote *r;
	int rc;

	if (!path || !out)
		return ckv_errf(e, -EINVAL, "remote source: no path");
	rc = ckv_ctl_find_path(path, sock, sizeof(sock));
	if (rc < 0)
		return ckv_errf(e, rc, "%s: no ckvfs control socket found (%s)", path, strerror(-rc));
	if (strlen(sock) >= sizeof(sa.sun_path))
		return ckv_errf(e, -ENAMETOOLONG, "%s: socket path too long for AF_UNIX", sock);
	memcpy(sa.sun_path, sock, strlen(sock) + 1);

	r = calloc(1, sizeof(*r));
	if (!r)
		return ckv_errf(e, -ENOMEM, "remote source: out of memory");
	r->src.ops = &remote_ops;
	pthread_mutex_init(&r->send_lock, NULL);
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cv, NULL);
	r->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (r->fd < 0) {
		rc = ckv_errf(e, -errno, "socket: %s", strerror(errno));
		goto out_free;
	}
	if (connect(r->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rc = ckv_errf(e, -errno, "%s: connect: %s", sock, strerror(errno));
		goto out_free;
	}
	r->next_id = 1; /* HELLO was 1 */
	rc = hello(r, sock, e);
	if (rc < 0)
		goto out_free;
	rc = pthread_create(&r->rx, NULL, rx_main, r);
	if (rc) {
		rc = ckv_errf(e, -rc, "remote source: pthread_create: %s", strerror(rc));
		goto out_free;
	}
	r->rx_running = true;
	*out = &r->src;
	return 0;

out_free:
	r_destroy(&r->src);
	return rc;
}
