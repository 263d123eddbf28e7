/*
 * ctl.c — the control-socket server (docs/PROTOCOL.md); the contract is
 * ckv_ctl.h, the messages are ckv_ctl_msg.h.
 *
 * Threads. One server thread runs an epoll loop over the listening socket,
 * an eventfd and every client socket (level-triggered, all non-blocking):
 * it accepts, reads and parses requests, runs them (store look-ups, prefix
 * views, engine calls), and writes replies from a per-client output buffer.
 * It never blocks on a client. Requests run on it one at a time, in
 * arrival order per client: MATCH and OPEN are short LMDB look-ups, the
 * first GET of a layer part loads its sums, DIGESTS reads digest.bin; chunk
 * reads are the engine's and asynchronous. Engine completions of GETs run
 * on the engine's I/O thread (get_cb): they turn the slot into a pin of
 * the client, append a COMPLETE entry to the client's pending list and wake
 * the server thread, which packs whatever has accumulated into COMPLETE
 * messages.
 *
 * Lifetimes. A client (struct conn) is reference-counted: one reference for
 * being connected, one per GET in flight in the engine. Disconnecting marks
 * it dead, releases every pin it holds and closes its handles at once; a GET
 * still in flight keeps the struct (not the socket) until its last callback,
 * and those callbacks release their chunks immediately. A GET holds its own
 * references to the prefix view and the engine files it reads, so closing
 * the handle under it is harmless. ckv_ctl_stop waits for every GET in
 * flight (ctl->gets_inflight) before it returns, so the engine may be closed
 * right after.
 *
 * Pins. A client's pins live in a table of entries {slot, len, gen}; the
 * token given out is gen << 32 | index, so a stale or forged token is
 * recognised (gen differs) without a search. Capacity for the pins and the
 * pending completions of a GET is reserved when the GET is accepted, so the
 * engine thread never allocates.
 *
 * Locks, in order: conn->lock, then the engine's lock (ckv_engine_* calls),
 * then ctl->lock (a leaf, for the drain wait). The server thread drops
 * conn->lock before calling into the engine where it can.
 */
#include "ckv_ctl.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ckv_ctl_msg.h"
#include "ckv_pview.h"

#define CTL_READ_CHUNK (64u << 10)
#define CTL_READ_BUDGET (1u << 20)  /* bytes read from one client per wake-up */
#define CTL_IN_KEEP (1u << 20)      /* input buffers above this are freed when empty */
#define CTL_OUT_FLOOR (64ull << 20) /* out_limit is max(this, 4 * max_msg) */
#define CTL_MAX_EVENTS 64
#define CTL_BACKLOG 128
#define CTL_HANDLE_IDX 0xffffu
#define CTL_NO_PIN UINT32_MAX
#define CTL_ERRLEN 512

struct pin {
	ckv_slot *slot; /* NULL when free */
	uint64_t len;
	uint32_t gen;   /* part of the token; bumped at release, never 0 */
	uint32_t next;  /* free list */
};

struct handle {
	ckv_pview *v; /* a reference; NULL when free */
	uint16_t gen; /* handle = gen << 16 | index; never 0 */
};

struct conn;

/* One GET in the engine; freed after its last callback (engine I/O thread). */
struct getop {
	struct conn *c;    /* a reference */
	ckv_pview *v;      /* a reference */
	ckv_efile **files; /* [nextents], a reference each */
	uint32_t id;       /* request id */
	uint32_t n;
	uint64_t part_len;
	atomic_uint delivered;
};

struct conn {
	ckv_ctl *ctl;              /* immutable */
	atomic_uint refs;          /* being connected + one per GET in flight */
	pid_t pid;                 /* SO_PEERCRED; immutable */
	uid_t uid;

	/* server thread only */
	struct conn *prev, *next;  /* ctl->conns, then ctl->zombies */
	int fd;                    /* -1 once disconnected */
	uint32_t events;           /* epoll interest */
	uint16_t version;          /* 0 until HELLO */
	int64_t hello_due;         /* CLOCK_MONOTONIC ns by which HELLO must have come */
	uint8_t *in;
	size_t in_len, in_cap;
	ckv_ctl_buf out;
	size_t out_off;            /* bytes of out already sent */
	struct handle *h;
	uint32_t hcap, nopen;

	pthread_mutex_t lock;      /* protects the fields below; before the engine's lock */
	bool dead;
	struct pin *pins;
	uint32_t pins_cap, pin_free;
	uint64_t npins;            /* held, plus reserved by GETs in flight */
	uint64_t pinned_bytes;     /* the same in bytes */
	uint32_t inflight;         /* GETs in flight */
	uint32_t *pend_id;         /* completions to send: request id ... */
	uint8_t *pend_ent;         /* ... and entry, CKV_CTL_ENTRY bytes each */
	size_t npend, pend_cap;
	size_t pend_reserved;      /* completions GETs in flight will still add */
};

struct ckv_ctl {
	/* immutable after start */
	ckv_store *store;
	ckv_engine *engine;
	ckv_ctl_limits lim;        /* defaults applied */
	uint64_t out_limit;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	dev_t sock_dev;
	ino_t sock_ino;
	int lfd, epfd, evfd;
	int arena_ro;              /* the arena, opened O_RDONLY, passed to clients */
	uint64_t arena_size;
	pthread_t thread;

	atomic_bool stopping;
	atomic_bool kicked;        /* evfd written and not yet seen by the server thread */

	/* server thread only */
	struct conn *conns, *zombies;
	uint32_t nconns;
	unsigned accept_errors;

	/* statistics */
	_Atomic uint64_t st_clients, st_accepted, st_refused, st_messages, st_errors, st_hostile,
		st_disconnects, st_pins;

	pthread_mutex_t lock;      /* a leaf: protects gets_inflight */
	pthread_cond_t drained;    /* gets_inflight reached 0 */
	uint64_t gets_inflight;
};

/* ---- logging and small helpers ------------------------------------------- */

static void default_log(void *arg, const char *msg)
{
	(void)arg;
	fprintf(stderr, "%s\n", msg);
}

static void clog_(const ckv_ctl *ctl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void clog_(const ckv_ctl *ctl, const char *fmt, ...)
{
	char buf[CTL_ERRLEN + 128];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	ctl->lim.log(ctl->lim.log_arg, buf);
}

static int64_t mono_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void ctl_kick(ckv_ctl *ctl)
{
	if (!atomic_exchange(&ctl->kicked, true))
		eventfd_write(ctl->evfd, 1);
}

static uint64_t path_hash(const char *s)
{
	return ckv_chunk_sum(s, strlen(s)); /* XXH3-64 */
}

/* ---- socket paths ---------------------------------------------------------- */

#define CTL_RUN_DIR "/run/ckvfs"

static bool run_dir_usable(void)
{
	struct stat st;

	if (mkdir(CTL_RUN_DIR, 0755) == 0)
		chmod(CTL_RUN_DIR, 0755); /* whatever the umask took away */
	else if (errno != EEXIST)
		return false;
	return lstat(CTL_RUN_DIR, &st) == 0 && S_ISDIR(st.st_mode) &&
	       faccessat(AT_FDCWD, CTL_RUN_DIR, W_OK | X_OK, AT_EACCESS) == 0;
}

/* Whether dir is a directory of ours alone (not a symlink, mode 0700 or narrower). */
static int dir_ours(const char *dir)
{
	struct stat st;

	if (lstat(dir, &st) < 0)
		return -errno;
	if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077))
		return -EPERM; /* someone else's, a symlink, or open to others */
	return 0;
}

/*
 * Whether dir, a directory holding sockets we would connect to, can only
 * have been written by us or by root: owned by one of the two, not a
 * symlink, not writable by group or others.
 */
static bool dir_trusted(const char *dir)
{
	struct stat st;

	return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) &&
	       (st.st_uid == 0 || st.st_uid == geteuid()) && !(st.st_mode & 022);
}

static int tmp_dir(char *dir, size_t len)
{
	snprintf(dir, len, "/tmp/ckvfs-%u", (unsigned)geteuid());
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	return dir_ours(dir);
}

int ckv_ctl_default_path(const char *mountpoint, char *out, size_t len)
{
	char rp[PATH_MAX], dir[64];
	uint64_t h;
	int n, rc;

	if (!mountpoint || !out)
		return -EINVAL;
	if (!realpath(mountpoint, rp))
		return -errno;
	h = path_hash(rp);
	if (run_dir_usable()) {
		snprintf(dir, sizeof(dir), "%s", CTL_RUN_DIR);
	} else {
		rc = tmp_dir(dir, sizeof(dir));
		if (rc < 0)
			return rc;
	}
	n = snprintf(out, len, "%s/%016" PRIx64 ".sock", dir, h);
	if (n < 0 || (size_t)n >= len || (size_t)n >= sizeof(((struct sockaddr_un *)0)->sun_path))
		return -ENAMETOOLONG;
	return 0;
}

static bool is_socket(const char *p)
{
	struct stat st;

	return stat(p, &st) == 0 && S_ISSOCK(st.st_mode);
}

static int put_path(char *out, size_t len, const char *p)
{
	int n = snprintf(out, len, "%s", p);

	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int ckv_ctl_find_path(const char *path, char *out, size_t len)
{
	char link[PATH_MAX], tgt[PATH_MAX], cand[PATH_MAX + 16], rp[PATH_MAX], tmp[64];
	struct stat st;
	ssize_t n;
	uint64_t h;

	if (!path || !out)
		return -EINVAL;
	if (stat(path, &st) < 0)
		return -errno;
	if (S_ISSOCK(st.st_mode))
		return put_path(out, len, path);
	if (!S_ISDIR(st.st_mode))
		return -ENOTSOCK;

	/* The mount's own pointer. */
	snprintf(link, sizeof(link), "%s/.ckv/ctl", path);
	n = readlink(link, tgt, sizeof(tgt) - 1);
	if (n > 0) {
		tgt[n] = 0;
		if (tgt[0] == '/')
			snprintf(cand, sizeof(cand), "%s", tgt);
		else
			snprintf(cand, sizeof(cand), "%s/.ckv/%s", path, tgt);
		if (is_socket(cand))
			return put_path(out, len, cand);
	} else if (is_socket(link)) {
		return put_path(out, len, link);
	}

	/*
	 * The default locations ckv_ctl_default_path would have chosen, in
	 * directories nobody else could have planted a socket in (the daemon
	 * refuses the same /tmp directory ckv_ctl_default_path does).
	 */
	if (!realpath(path, rp))
		return -errno;
	h = path_hash(rp);
	snprintf(cand, sizeof(cand), "%s/%016" PRIx64 ".sock", CTL_RUN_DIR, h);
	if (dir_trusted(CTL_RUN_DIR) && is_socket(cand))
		return put_path(out, len, cand);
	snprintf(tmp, sizeof(tmp), "/tmp/ckvfs-%u", (unsigned)geteuid());
	snprintf(cand, sizeof(cand), "%s/%016" PRIx64 ".sock", tmp, h);
	if (dir_ours(tmp) == 0 && is_socket(cand))
		return put_path(out, len, cand);
	return -ENOENT;
}

/* ---- clients: references ------------------------------------------------- */

static void conn_get(struct conn *c)
{
	atomic_fetch_add(&c->refs, 1);
}

static void conn_put(struct conn *c)
{
	assert(atomic_load(&c->refs) > 0);
	if (atomic_fetch_sub(&c->refs, 1) != 1)
		return;
	assert(c->fd < 0 && c->nopen == 0 && c->inflight == 0);
	free(c->in);
	ckv_ctl_buf_free(&c->out);
	free(c->h);
	free(c->pins);
	free(c->pend_id);
	free(c->pend_ent);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* ---- clients: output ------------------------------------------------------ */

static void conn_disconnect(struct conn *c, bool flush);

static void conn_set_events(struct conn *c, uint32_t ev)
{
	struct epoll_event e = { .events = ev, .data.ptr = c };

	if (c->fd < 0 || ev == c->events)
		return;
	if (epoll_ctl(c->ctl->epfd, EPOLL_CTL_MOD, c->fd, &e) == 0)
		c->events = ev;
}

/* Send what is queued, without blocking. 0, or -1 when the client is gone. */
static int conn_flush(struct conn *c)
{
	while (c->fd >= 0 && c->out_off < c->out.len) {
		ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			conn_disconnect(c, false);
			return -1;
		}
		c->out_off += (size_t)n;
	}
	if (c->fd < 0)
		return -1;
	if (c->out_off == c->out.len) {
		c->out.len = c->out_off = 0;
		if (c->out.cap > CTL_IN_KEEP)
			ckv_ctl_buf_free(&c->out);
		conn_set_events(c, EPOLLIN | EPOLLRDHUP);
	} else {
		conn_set_events(c, EPOLLIN | EPOLLRDHUP | EPOLLOUT);
	}
	return 0;
}

static uint16_t conn_version(const struct conn *c)
{
	return c->version ? c->version : CKV_CTL_VERSION_MIN;
}

/* Queue an ERROR; fatal ones are followed by conn_disconnect by the caller. */
static int queue_error(struct conn *c, uint32_t id, int err, bool fatal, const char *text)
{
	ckv_ctl_msg m = { .hdr = { .version = conn_version(c), .type = CKV_CTL_ERROR, .id = id } };
	size_t tl = strlen(text);

	m.u.error.err = err > 0 && err < 4096 ? err : EIO;
	m.u.error.flags = fatal ? CKV_CTL_ERR_FATAL : 0;
	m.u.error.text_len = (uint16_t)(tl > CKV_CTL_MAX_TEXT ? CKV_CTL_MAX_TEXT : tl);
	m.u.error.text = text;
	atomic_fetch_add(&c->ctl->st_errors, 1);
	return ckv_ctl_encode(&c->out, &m);
}

/*
 * The client broke the protocol: tell it why, disconnect it. Returns -1 so
 * that handlers can `return hostile(...)`.
 */
static int hostile(struct conn *c, uint32_t id, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int hostile(struct conn *c, uint32_t id, int err, const char *fmt, ...)
{
	char text[CTL_ERRLEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	clog_(c->ctl, "ckv ctl: client pid %d uid %u: %s (%s); disconnected", (int)c->pid,
	      (unsigned)c->uid, text, strerror(err));
	atomic_fetch_add(&c->ctl->st_hostile, 1);
	queue_error(c, id, err, true, text);
	conn_disconnect(c, true);
	return -1;
}

/* Output queued past out_limit: the client does not read. 0 or -1. */
static int check_out(struct conn *c)
{
	if (c->out.len - c->out_off <= c->ctl->out_limit)
		return 0;
	return hostile(c, 0, ENOBUFS, "%zu bytes of replies unread; the limit is %" PRIu64,
		       c->out.len - c->out_off, c->ctl->out_limit);
}

/* A reply; -1 when the client had to go. */
static int reply(struct conn *c, const ckv_ctl_msg *m)
{
	if (ckv_ctl_encode(&c->out, m) < 0) {
		clog_(c->ctl, "ckv ctl: client pid %d: out of memory for a reply; disconnected",
		      (int)c->pid);
		conn_disconnect(c, false);
		return -1;
	}
	return check_out(c);
}

/* A non-fatal ERROR for request id. */
static int reply_err(struct conn *c, uint32_t id, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int reply_err(struct conn *c, uint32_t id, int err, const char *fmt, ...)
{
	char text[CTL_ERRLEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	if (queue_error(c, id, err, false, text) < 0) {
		conn_disconnect(c, false);
		return -1;
	}
	return check_out(c);
}

/*
 * Pack the completions the engine thread queued into COMPLETE messages.
 * Consecutive entries of one GET share a message (up to max_msg).
 */
static int conn_drain(struct conn *c)
{
	uint32_t per_msg = (c->ctl->lim.max_msg - 8) / CKV_CTL_ENTRY;
	int rc = 0;

	pthread_mutex_lock(&c->lock);
	for (size_t i = 0, j; i < c->npend && rc == 0; i = j) {
		ckv_ctl_msg m = { .hdr = { .version = conn_version(c), .type = CKV_CTL_COMPLETE,
					   .id = c->pend_id[i] } };

		for (j = i + 1; j < c->npend && c->pend_id[j] == c->pend_id[i] && j - i < per_msg; j++)
			;
		m.u.complete.count = (uint32_t)(j - i);
		m.u.complete.entries = c->pend_ent + i * CKV_CTL_ENTRY;
		rc = ckv_ctl_encode(&c->out, &m);
	}
	c->npend = 0;
	pthread_mutex_unlock(&c->lock);
	if (rc < 0) {
		clog_(c->ctl, "ckv ctl: client pid %d: out of memory for completions; disconnected",
		      (int)c->pid);
		conn_disconnect(c, false);
		return -1;
	}
	return check_out(c);
}

/* ---- clients: disconnect ---------------------------------------------------- */

/*
 * The client is gone (or must go): stop serving it, release its pins, close
 * its handles. The struct stays on ctl->zombies until the end of the epoll
 * batch (an event of this batch may still name it), then loses the
 * connection's reference.
 */
static void conn_disconnect(struct conn *c, bool flush)
{
	ckv_ctl *ctl = c->ctl;
	ckv_slot **slots = NULL;
	size_t nslots = 0, released = 0;
	char sink[4096];

	if (c->fd < 0)
		return;
	if (flush) {
		/* One try: an ERROR that does not fit the socket now is dropped. */
		while (c->out_off < c->out.len) {
			ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off,
					 MSG_NOSIGNAL | MSG_DONTWAIT);
			if (n <= 0)
				break;
			c->out_off += (size_t)n;
		}
	}
	epoll_ctl(ctl->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	shutdown(c->fd, SHUT_WR);
	/*
	 * Unread input makes the kernel flag the peer with ECONNRESET at
	 * close, which could hide the ERROR from it: read a bounded amount away.
	 */
	for (int i = 0; i < 256 && recv(c->fd, sink, sizeof(sink), MSG_DONTWAIT) > 0; i++)
		;
	close(c->fd);
	c->fd = -1;

	pthread_mutex_lock(&c->lock);
	c->dead = true;
	c->npend = 0;
	slots = malloc(sizeof(*slots) * (c->pins_cap ? c->pins_cap : 1));
	for (uint32_t i = 0; i < c->pins_cap; i++) {
		struct pin *p = &c->pins[i];

		if (!p->slot)
			continue;
		c->npins--;
		c->pinned_bytes -= p->len;
		released++;
		if (slots)
			slots[nslots++] = p->slot;
		else
			ckv_engine_release(ctl->engine, p->slot); /* no memory: under the lock, still fine */
		p->slot = NULL;
	}
	pthread_mutex_unlock(&c->lock);
	atomic_fetch_sub(&ctl->st_pins, (uint64_t)released);
	for (size_t i = 0; i < nslots; i++)
		ckv_engine_release(ctl->engine, slots[i]);
	free(slots);

	for (uint32_t i = 0; i < c->hcap; i++)
		if (c->h[i].v) {
			ckv_pview_put(c->h[i].v);
			c->h[i].v = NULL;
		}
	c->nopen = 0;
	free(c->in);
	c->in = NULL;
	c->in_len = c->in_cap = 0;
	ckv_ctl_buf_free(&c->out);
	c->out_off = 0;

	/* from ctl->conns to ctl->zombies */
	if (c->prev)
		c->prev->next = c->next;
	else
		ctl->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = NULL;
	c->next = ctl->zombies;
	ctl->zombies = c;
	ctl->nconns--;
	atomic_fetch_sub(&ctl->st_clients, 1);
	atomic_fetch_add(&ctl->st_disconnects, 1);
}

static void bury_zombies(ckv_ctl *ctl)
{
	struct conn *c, *next;

	for (c = ctl->zombies; c; c = next) {
		next = c->next;
		conn_put(c);
	}
	ctl->zombies = NULL;
}

/* ---- engine completions ------------------------------------------------------ */

static void getop_finish(struct getop *op)
{
	struct conn *c = op->c;
	ckv_ctl *ctl = c->ctl;

	ckv_pview_files_put(op->v, op->files);
	ckv_pview_put(op->v);
	free(op->files);
	free(op);

	pthread_mutex_lock(&c->lock);
	assert(c->inflight > 0);
	c->inflight--;
	pthread_mutex_unlock(&c->lock);
	conn_put(c);

	/* Last: ckv_ctl_stop may free ctl as soon as this count reaches 0. */
	pthread_mutex_lock(&ctl->lock);
	assert(ctl->gets_inflight > 0);
	if (--ctl->gets_inflight == 0)
		pthread_cond_broadcast(&ctl->drained);
	pthread_mutex_unlock(&ctl->lock);
}

/* Engine callback, on the engine's I/O thread: one chunk of a GET. */
static void get_cb(void *arg, size_t i, ckv_slot *slot, int rc)
{
	struct getop *op = arg;
	struct conn *c = op->c;
	ckv_ctl *ctl = c->ctl;
	ckv_ctl_entry ent = { .index = (uint32_t)i, .rc = rc };
	ckv_slot *drop = NULL;
	bool queued = false;

	if (rc == 0 && (!slot || ckv_slot_offset(slot) == CKV_SLOT_DETACHED)) {
		/* not in the arena (only streaming gets do this): useless to a client */
		drop = slot;
		ent.rc = -EIO;
	} else if (rc < 0) {
		ent.rc = rc < -4095 ? -EIO : rc;
	}

	pthread_mutex_lock(&c->lock);
	assert(c->pend_reserved > 0);
	c->pend_reserved--;
	if (ent.rc == 0 && !c->dead) {
		uint32_t k = c->pin_free;
		struct pin *p;

		assert(k != CTL_NO_PIN); /* reserved when the GET was accepted */
		p = &c->pins[k];
		c->pin_free = p->next;
		p->slot = slot;
		p->len = op->part_len;
		ent.offset = ckv_slot_offset(slot);
		ent.length = ckv_slot_len(slot);
		ent.token = (uint64_t)p->gen << 32 | k;
	} else {
		if (ent.rc == 0)
			drop = slot; /* dead client */
		c->npins--;
		c->pinned_bytes -= op->part_len;
		atomic_fetch_sub(&ctl->st_pins, 1);
	}
	if (!c->dead) {
		assert(c->npend < c->pend_cap);
		c->pend_id[c->npend] = op->id;
		ckv_ctl_entry_store(c->pend_ent + c->npend * CKV_CTL_ENTRY, &ent);
		c->npend++;
		queued = true;
	}
	pthread_mutex_unlock(&c->lock);

	if (drop)
		ckv_engine_release(ctl->engine, drop);
	if (queued)
		ctl_kick(ctl);
	if (atomic_fetch_add(&op->delivered, 1) + 1 == op->n)
		getop_finish(op);
}

/* ---- request handlers (server thread) --------------------------------------- */

static ckv_pview *handle_find(struct conn *c, uint32_t handle)
{
	uint32_t idx = handle & CTL_HANDLE_IDX;

	if (idx >= c->hcap || !c->h[idx].v || c->h[idx].gen != (handle >> 16))
		return NULL;
	return c->h[idx].v;
}

static uint64_t part_len(const ckv_manifest *m, unsigned part)
{
	return part == CKV_CTL_PART_KV ? m->geom.chunk_bytes : m->geom.half_bytes;
}

/*
 * Checks shared by GET, PREFETCH, SCORE and DIGESTS: the handle is open,
 * the layer and every chunk in range. Returns the view, or NULL after
 * disconnecting the client.
 */
static ckv_pview *check_target(struct conn *c, const char *what, uint32_t id, uint32_t handle,
			       uint32_t layer, const void *chunks, uint32_t n)
{
	ckv_pview *v = handle_find(c, handle);
	const ckv_manifest *m;

	if (!v) {
		hostile(c, id, EBADF, "%s: handle 0x%x is not open", what, handle);
		return NULL;
	}
	m = ckv_pview_manifest(v);
	if (layer >= m->geom.layers) {
		hostile(c, id, ERANGE, "%s: layer %u, the prefix has %u layers", what, layer,
			m->geom.layers);
		return NULL;
	}
	for (uint32_t i = 0; i < n; i++) {
		uint32_t j = ckv_ctl_u32(chunks, i);

		if (j >= m->chunks) {
			hostile(c, id, ERANGE, "%s: chunks[%u] = %u, the prefix has %u chunks", what, i, j,
				m->chunks);
			return NULL;
		}
	}
	return v;
}

static int h_hello(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl *ctl = c->ctl;
	ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_HELLO_OK, .id = req->hdr.id } };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov;
	struct msghdr mh = { 0 };
	struct cmsghdr *cm;
	uint16_t best = 0;
	ssize_t n;

	if (c->version)
		return hostile(c, req->hdr.id, EPROTO, "HELLO: the connection already said HELLO");
	for (uint32_t i = 0; i < req->u.hello.nversions; i++) {
		uint16_t v = ckv_ctl_u16(req->u.hello.versions, i);

		if (v >= CKV_CTL_VERSION_MIN && v <= CKV_CTL_VERSION && v > best)
			best = v;
	}
	if (!best)
		return hostile(c, req->hdr.id, EPROTONOSUPPORT,
			       "HELLO: no version in common; this server speaks %u..%u",
			       CKV_CTL_VERSION_MIN, CKV_CTL_VERSION);
	c->version = best;
	m.hdr.version = best;
	m.u.hello_ok.version = best;
	m.u.hello_ok.flags = CKV_CTL_HELLO_ARENA_FD;
	m.u.hello_ok.arena_size = ctl->arena_size;
	m.u.hello_ok.max_msg = ctl->lim.max_msg;
	m.u.hello_ok.max_pins = ctl->lim.max_pins;
	m.u.hello_ok.max_pinned_bytes = ctl->lim.max_pinned_bytes;
	m.u.hello_ok.max_prefixes = ctl->lim.max_prefixes;
	m.u.hello_ok.max_inflight = ctl->lim.max_inflight;
	m.u.hello_ok.server_pid = (uint32_t)getpid();

	/* HELLO is the first request, so nothing is queued before this reply. */
	assert(c->out.len == c->out_off);
	c->out.len = c->out_off = 0;
	if (ckv_ctl_encode(&c->out, &m) < 0) {
		conn_disconnect(c, false);
		return -1;
	}
	iov.iov_base = c->out.p;
	iov.iov_len = c->out.len;
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	memset(cbuf, 0, sizeof(cbuf));
	mh.msg_control = cbuf;
	mh.msg_controllen = sizeof(cbuf);
	cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &ctl->arena_ro, sizeof(int));
	do
		n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		/* The descriptor must ride with the first byte: no retry later. */
		clog_(ctl, "ckv ctl: client pid %d: sending HELLO_OK: %s; disconnected", (int)c->pid,
		      n < 0 ? strerror(errno) : "nothing sent");
		conn_disconnect(c, false);
		return -1;
	}
	c->out_off = (size_t)n;
	return 0;
}

static int h_match(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl_msg m = { .hdr = { .version = c->version, .type = CKV_CTL_MATCH_OK,
				   .id = req->hdr.id } };
	ckv_geom g;
	ckv_err e = { { 0 } };
	ckv_hash h = { { 0 } };
	uint32_t matched = 0, lookups = 0, *tokens;
	int rc;

	memset(&g, 0, sizeof(g));
	memcpy(g.model, req->u.match.model, req->u.match.model_len);
	memcpy(g.salt, req->u.match.salt, req->u.match.salt_len);
	g.dtype = (ckv_dtype)req->u.match.dtype;
	g.layers = req->u.match.layers;
	g.kv_heads = req->u.match.kv_heads;
	g.head_dim = req->u.match.head_dim;
	g.chunk_tokens = req->u.match.chunk_tokens;
	rc = ckv_geom_init(&g, &e);
	if (rc < 0) /* whatever the cause (a size that overflows, a name too long): EINVAL, as specified */
		return reply_err(c, req->hdr.id, EINVAL, "MATCH: %s", e.msg);
	tokens = malloc(sizeof(*tokens) * (req->u.match.ntokens ? req->u.match.ntokens : 1));
	if (!tokens)
		return reply_err(c, req->hdr.id, ENOMEM, "MATCH: no memory for %u tokens",
				 req->u.match.ntokens);
	memcpy(tokens, req->u.match.tokens, sizeof(*tokens) * req->u.match.ntokens);
	rc = ckv_store_match(c->ctl->store, &g, tokens, req->u.match.ntokens, &h, &matched, &lookups);
	free(tokens);
	if (rc < 0)
		return reply_err(c, req->hdr.id, -rc, "MATCH: store: %s", strerror(-rc));
	memcpy(m.u.match_ok.hash, h.b, 16);
	m.u.match_ok.matched = matched;
	return reply(c, &m);
}

static int h_open(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl *ctl = c->ctl;
	ckv_ctl_msg m = { .hdr = { .version = c->version, .type = CKV_CTL_OPEN_OK,
				   .id = req->hdr.id } };
	const ckv_manifest *mf;
	char hex[CKV_HASH_HEX + 1];
	ckv_err e = { { 0 } };
	ckv_pview *v;
	ckv_hash h;
	uint32_t idx;
	int rc;

	memcpy(h.b, req->u.open.hash, 16);
	ckv_hash_hex(&h, hex);
	if (c->nopen >= ctl->lim.max_prefixes)
		return reply_err(c, req->hdr.id, EMFILE, "OPEN: %u prefixes open, the limit is %u",
				 c->nopen, ctl->lim.max_prefixes);
	rc = ckv_pview_open(ctl->store, ctl->engine, &h, &v, &e);
	if (rc == -ENOENT)
		return reply_err(c, req->hdr.id, ENOENT, "OPEN: prefix %s is not stored", hex);
	if (rc < 0)
		return reply_err(c, req->hdr.id, -rc, "OPEN: prefix %s: %s", hex,
				 e.msg[0] ? e.msg : strerror(-rc));
	for (idx = 0; idx < c->hcap && c->h[idx].v; idx++)
		;
	if (idx == c->hcap) {
		uint32_t ncap = c->hcap ? c->hcap * 2 : 8;
		struct handle *nh;

		if (ncap > ctl->lim.max_prefixes)
			ncap = ctl->lim.max_prefixes;
		nh = realloc(c->h, sizeof(*nh) * ncap);
		if (!nh) {
			ckv_pview_put(v);
			return reply_err(c, req->hdr.id, ENOMEM, "OPEN: no memory for a handle");
		}
		memset(nh + c->hcap, 0, sizeof(*nh) * (ncap - c->hcap));
		c->h = nh;
		c->hcap = ncap;
	}
	if (++c->h[idx].gen == 0)
		c->h[idx].gen = 1;
	c->h[idx].v = v;
	c->nopen++;

	mf = ckv_pview_manifest(v);
	m.u.open_ok.handle = (uint32_t)c->h[idx].gen << 16 | idx;
	m.u.open_ok.dtype = (uint32_t)mf->geom.dtype;
	memcpy(m.u.open_ok.hash, mf->hash.b, 16);
	m.u.open_ok.layers = mf->geom.layers;
	m.u.open_ok.kv_heads = mf->geom.kv_heads;
	m.u.open_ok.head_dim = mf->geom.head_dim;
	m.u.open_ok.chunk_tokens = mf->geom.chunk_tokens;
	m.u.open_ok.tokens = mf->tokens;
	m.u.open_ok.chunks = mf->chunks;
	m.u.open_ok.half_bytes = mf->geom.half_bytes;
	m.u.open_ok.chunk_bytes = mf->geom.chunk_bytes;
	m.u.open_ok.seed = mf->geom.seed;
	m.u.open_ok.created = mf->created;
	m.u.open_ok.model = mf->geom.model;
	m.u.open_ok.model_len = (uint16_t)strnlen(mf->geom.model, CKV_CTL_MAX_MODEL);
	m.u.open_ok.salt = mf->geom.salt;
	m.u.open_ok.salt_len = (uint16_t)strnlen(mf->geom.salt, CKV_CTL_MAX_SALT);
	return reply(c, &m);
}

static int h_close(struct conn *c, const ckv_ctl_msg *req)
{
	uint32_t handle = req->u.close.handle, idx = handle & CTL_HANDLE_IDX;

	if (!handle_find(c, handle))
		return hostile(c, req->hdr.id, EBADF, "CLOSE: handle 0x%x is not open", handle);
	ckv_pview_put(c->h[idx].v);
	c->h[idx].v = NULL;
	c->nopen--;
	return 0;
}

/* Engine refs of chunks[0..n) of a layer part; *files_out and *refs_out malloc'ed. */
static int make_refs(ckv_pview *v, uint32_t layer, unsigned part, const void *chunks, uint32_t n,
		     ckv_efile ***files_out, ckv_chunk_ref **refs_out)
{
	const ckv_manifest *m = ckv_pview_manifest(v);
	ckv_efile **files = calloc(m->nextents ? m->nextents : 1, sizeof(*files));
	ckv_chunk_ref *refs = malloc(sizeof(*refs) * n);
	int rc;

	if (!files || !refs) {
		rc = -ENOMEM;
		goto out_free;
	}
	rc = ckv_pview_files_get(v, layer, (enum ckv_pview_part)part, files);
	if (rc < 0)
		goto out_free;
	for (uint32_t i = 0; i < n; i++)
		refs[i] = ckv_pview_ref(v, files, ckv_ctl_u32(chunks, i));
	*files_out = files;
	*refs_out = refs;
	return 0;

out_free:
	free(files);
	free(refs);
	return rc;
}

/* Room for `want` pins in the table (all of them free or held). c->lock held. */
static int pins_reserve(struct conn *c, uint64_t want)
{
	uint64_t ncap = c->pins_cap ? c->pins_cap : 64;
	struct pin *np;

	if (want <= c->pins_cap)
		return 0;
	while (ncap < want)
		ncap *= 2;
	if (ncap > UINT32_MAX - 1)
		return -ENOMEM;
	np = realloc(c->pins, sizeof(*np) * ncap);
	if (!np)
		return -ENOMEM;
	/* new entries go to the free list, lowest index first */
	for (uint64_t k = ncap; k-- > c->pins_cap;) {
		np[k] = (struct pin){ .slot = NULL, .len = 0, .gen = 1, .next = c->pin_free };
		c->pin_free = (uint32_t)k;
	}
	c->pins = np;
	c->pins_cap = (uint32_t)ncap;
	return 0;
}

/* Room for `want` pending completions. c->lock held. */
static int pend_reserve(struct conn *c, size_t want)
{
	size_t ncap = c->pend_cap ? c->pend_cap : 64;
	uint32_t *ni;
	uint8_t *ne;

	if (want <= c->pend_cap)
		return 0;
	while (ncap < want)
		ncap *= 2;
	ni = realloc(c->pend_id, sizeof(*ni) * ncap);
	if (!ni)
		return -ENOMEM;
	c->pend_id = ni;
	ne = realloc(c->pend_ent, CKV_CTL_ENTRY * ncap);
	if (!ne)
		return -ENOMEM;
	c->pend_ent = ne;
	c->pend_cap = ncap;
	return 0;
}

static int h_get(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl *ctl = c->ctl;
	uint32_t id = req->hdr.id, n = req->u.get.n;
	ckv_efile **files = NULL;
	ckv_chunk_ref *refs = NULL;
	struct getop *op = NULL;
	uint64_t len, bytes;
	ckv_pview *v;
	int rc;

	v = check_target(c, "GET", id, req->u.get.handle, req->u.get.layer, req->u.get.chunks, n);
	if (!v)
		return -1;
	len = part_len(ckv_pview_manifest(v), req->u.get.part);
	bytes = len * n;

	pthread_mutex_lock(&c->lock);
	if (c->inflight >= ctl->lim.max_inflight) {
		pthread_mutex_unlock(&c->lock);
		return reply_err(c, id, EAGAIN, "GET: %u GETs in flight, the limit is %u", c->inflight,
				 ctl->lim.max_inflight);
	}
	if (c->npins + n > ctl->lim.max_pins || c->pinned_bytes + bytes > ctl->lim.max_pinned_bytes) {
		uint64_t p = c->npins, b = c->pinned_bytes;

		pthread_mutex_unlock(&c->lock);
		return reply_err(c, id, ENOBUFS,
				 "GET: %u more chunks (%" PRIu64 " bytes) on top of %" PRIu64
				 " pins (%" PRIu64 " bytes) exceed the limit of %u pins, %" PRIu64 " bytes",
				 n, bytes, p, b, ctl->lim.max_pins, ctl->lim.max_pinned_bytes);
	}
	pthread_mutex_unlock(&c->lock);

	rc = make_refs(v, req->u.get.layer, req->u.get.part, req->u.get.chunks, n, &files, &refs);
	if (rc < 0)
		return reply_err(c, id, -rc, "GET: layer %u: %s", req->u.get.layer, strerror(-rc));
	op = calloc(1, sizeof(*op));
	if (!op) {
		rc = -ENOMEM;
		goto out_put_files;
	}
	op->c = c;
	op->v = v;
	op->files = files;
	op->id = id;
	op->n = n;
	op->part_len = len;
	atomic_init(&op->delivered, 0);

	pthread_mutex_lock(&c->lock);
	rc = pins_reserve(c, c->npins + n);
	if (rc == 0)
		rc = pend_reserve(c, c->npend + c->pend_reserved + n);
	if (rc < 0) {
		pthread_mutex_unlock(&c->lock);
		goto out_free_op;
	}
	c->npins += n;
	c->pinned_bytes += bytes;
	c->pend_reserved += n;
	c->inflight++;
	pthread_mutex_unlock(&c->lock);
	conn_get(c);
	ckv_pview_get(v);
	atomic_fetch_add(&ctl->st_pins, n);
	pthread_mutex_lock(&ctl->lock);
	ctl->gets_inflight++;
	pthread_mutex_unlock(&ctl->lock);

	/* From here on op belongs to the engine thread: do not touch it. */
	rc = ckv_engine_get_async(ctl->engine, refs, n, CKV_GET_DEMAND, get_cb, op);
	free(refs);
	if (rc == 0)
		return 0;

	/* Nothing was queued, no callback will come: undo. */
	pthread_mutex_lock(&c->lock);
	c->npins -= n;
	c->pinned_bytes -= bytes;
	c->pend_reserved -= n;
	c->inflight--;
	pthread_mutex_unlock(&c->lock);
	atomic_fetch_sub(&ctl->st_pins, n);
	pthread_mutex_lock(&ctl->lock);
	ctl->gets_inflight--;
	pthread_mutex_unlock(&ctl->lock);
	ckv_pview_put(v);
	conn_put(c);
	refs = NULL;
out_free_op:
	free(op);
out_put_files:
	ckv_pview_files_put(v, files);
	free(files);
	free(refs);
	return reply_err(c, id, -rc, "GET: %s", strerror(-rc));
}

static int h_release(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl *ctl = c->ctl;
	uint32_t n = req->u.release.n, done = 0;
	ckv_slot **slots = malloc(sizeof(*slots) * n);
	uint64_t bad = 0;
	bool ok = true;

	if (!slots) {
		conn_disconnect(c, false);
		return -1;
	}
	pthread_mutex_lock(&c->lock);
	for (; done < n; done++) {
		uint64_t tok = ckv_ctl_u64(req->u.release.tokens, done);
		uint32_t k = (uint32_t)tok, gen = (uint32_t)(tok >> 32);
		struct pin *p = k < c->pins_cap ? &c->pins[k] : NULL;

		if (!p || !p->slot || p->gen != gen) {
			ok = false;
			bad = tok;
			break;
		}
		slots[done] = p->slot;
		c->npins--;
		c->pinned_bytes -= p->len;
		p->slot = NULL;
		p->len = 0;
		if (++p->gen == 0)
			p->gen = 1;
		p->next = c->pin_free;
		c->pin_free = k;
	}
	pthread_mutex_unlock(&c->lock);
	atomic_fetch_sub(&ctl->st_pins, done);
	for (uint32_t i = 0; i < done; i++)
		ckv_engine_release(ctl->engine, slots[i]);
	free(slots);
	if (!ok)
		return hostile(c, req->hdr.id, ENOENT, "RELEASE: tokens[%u] = 0x%" PRIx64 " is not held",
			       done, bad);
	return 0;
}

static int h_prefetch(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_efile **files = NULL;
	ckv_chunk_ref *refs = NULL;
	ckv_pview *v;
	int rc;

	v = check_target(c, "PREFETCH", req->hdr.id, req->u.get.handle, req->u.get.layer,
			 req->u.get.chunks, req->u.get.n);
	if (!v)
		return -1;
	rc = make_refs(v, req->u.get.layer, req->u.get.part, req->u.get.chunks, req->u.get.n, &files,
		       &refs);
	if (rc < 0)
		return reply_err(c, req->hdr.id, -rc, "PREFETCH: layer %u: %s", req->u.get.layer,
				 strerror(-rc));
	rc = ckv_engine_prefetch(c->ctl->engine, refs, req->u.get.n);
	ckv_pview_files_put(v, files); /* queued reads keep their files alive */
	free(files);
	free(refs);
	if (rc < 0)
		return reply_err(c, req->hdr.id, -rc, "PREFETCH: %s", strerror(-rc));
	return 0;
}

static int h_score(struct conn *c, const ckv_ctl_msg *req)
{
	uint32_t n = req->u.score.n;
	float *scores;
	ckv_pview *v;
	int rc = 0;

	v = check_target(c, "SCORE", req->hdr.id, req->u.score.handle, req->u.score.layer,
			 req->u.score.chunks, n);
	if (!v)
		return -1;
	scores = malloc(sizeof(*scores) * n);
	if (!scores)
		return reply_err(c, req->hdr.id, ENOMEM, "SCORE: no memory for %u scores", n);
	for (uint32_t i = 0; i < n; i++)
		scores[i] = ckv_ctl_f32(req->u.score.scores, i);
	for (unsigned part = 0; part <= CKV_CTL_PART_V && rc == 0; part++) {
		ckv_efile **files = NULL;
		ckv_chunk_ref *refs = NULL;

		if (!(req->u.score.parts & (1u << part)))
			continue;
		rc = make_refs(v, req->u.score.layer, part, req->u.score.chunks, n, &files, &refs);
		if (rc < 0)
			break;
		rc = ckv_engine_score(c->ctl->engine, refs, scores, n);
		ckv_pview_files_put(v, files);
		free(files);
		free(refs);
	}
	free(scores);
	if (rc < 0)
		return reply_err(c, req->hdr.id, -rc, "SCORE: layer %u: %s", req->u.score.layer,
				 strerror(-rc));
	return 0;
}

/* DIGESTS, KEYQ: the prefix view of an open handle whose layer and chunk range exist, or NULL (answered). */
static ckv_pview *range_target(struct conn *c, const char *what, uint32_t id, const struct ckv_ctl_range *r)
{
	ckv_pview *v = check_target(c, what, id, r->handle, r->layer, NULL, 0);
	uint32_t chunks;

	if (!v)
		return NULL;
	chunks = ckv_pview_manifest(v)->chunks;
	if ((uint64_t)r->first + r->count > chunks) {
		hostile(c, id, ERANGE, "%s: chunks %u..%" PRIu64 ", the prefix has %u chunks", what, r->first,
			(uint64_t)r->first + r->count, chunks);
		return NULL;
	}
	return v;
}

static int h_digests(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl_msg m = { .hdr = { .version = c->version, .type = CKV_CTL_DIGESTS_OK,
				   .id = req->hdr.id } };
	uint32_t first = req->u.digests.first, count = req->u.digests.count;
	const ckv_manifest *mf;
	ckv_pview *v;
	uint64_t per, need;
	float *buf;
	int rc;

	v = range_target(c, "DIGESTS", req->hdr.id, &req->u.digests);
	if (!v)
		return -1;
	mf = ckv_pview_manifest(v);
	per = (uint64_t)mf->geom.kv_heads * mf->geom.head_dim;
	need = 16 + 4 * per * count;
	if (need > c->ctl->lim.max_msg)
		return reply_err(c, req->hdr.id, E2BIG,
				 "DIGESTS: %u chunks need a %" PRIu64 "-byte reply, max_msg is %u", count,
				 need, c->ctl->lim.max_msg);
	buf = malloc(sizeof(float) * per * count); /* count >= 1 and fits max_msg (above) */
	if (!buf)
		return reply_err(c, req->hdr.id, ENOMEM, "DIGESTS: no memory");
	rc = ckv_pview_digests_range(v, req->u.digests.layer, first, count, buf);
	if (rc < 0) {
		free(buf);
		return reply_err(c, req->hdr.id, -rc, "DIGESTS: layer %u: %s", req->u.digests.layer,
				 strerror(-rc));
	}
	m.u.digests_ok.first = first;
	m.u.digests_ok.count = count;
	m.u.digests_ok.per = (uint32_t)per;
	m.u.digests_ok.data = buf;
	rc = reply(c, &m);
	free(buf);
	return rc;
}

static int h_keyq(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl_msg m = { .hdr = { .version = c->version, .type = CKV_CTL_KEYQ_OK,
				   .id = req->hdr.id } };
	uint32_t first = req->u.keyq.first, count = req->u.keyq.count;
	struct ckv_keyq kq;
	const ckv_manifest *mf;
	ckv_pview *v;
	uint64_t hd, need;
	char err[400];
	int rc;

	if (c->version < CKV_CTL_VERSION_KEYQ)
		return hostile(c, req->hdr.id, EPROTO, "KEYQ: needs protocol version %u, the connection speaks %u",
			       CKV_CTL_VERSION_KEYQ, c->version);
	v = range_target(c, "KEYQ", req->hdr.id, &req->u.keyq);
	if (!v)
		return -1;
	mf = ckv_pview_manifest(v);
	hd = (uint64_t)mf->geom.kv_heads * mf->geom.head_dim;
	/* the smallest answer there could be (1-bit codes, one part): refused before any read */
	need = 20 + 4 + 4 * hd + (uint64_t)count * ckv_keyq_chunk_bytes(&mf->geom, 1);
	if (need > c->ctl->lim.max_msg)
		return reply_err(c, req->hdr.id, E2BIG,
				 "KEYQ: %u chunks need at least a %" PRIu64 "-byte reply, max_msg is %u",
				 count, need, c->ctl->lim.max_msg);
	rc = ckv_pview_keyq(v, req->u.keyq.layer, first, count, &kq, err, sizeof(err));
	if (rc < 0)
		return reply_err(c, req->hdr.id, -rc, "KEYQ: layer %u: %s", req->u.keyq.layer, err);
	need = 20 + 4ull * kq.nparts + 4 * hd * kq.nparts + (uint64_t)count * kq.per; /* the payload */
	if (need > c->ctl->lim.max_msg || kq.nparts > UINT16_MAX) {
		ckv_keyq_free(&kq);
		return reply_err(c, req->hdr.id, E2BIG,
				 "KEYQ: %u chunks need a %" PRIu64 "-byte reply, max_msg is %u", count, need,
				 c->ctl->lim.max_msg);
	}
	for (uint32_t i = 0; i < kq.nparts; i++) /* the wire is little-endian, like the host */
		kq.first[i] = htole32(kq.first[i]);
	m.u.keyq_ok.first = first;
	m.u.keyq_ok.count = count;
	m.u.keyq_ok.bits = (uint16_t)kq.bits;
	m.u.keyq_ok.nparts = (uint16_t)kq.nparts;
	m.u.keyq_ok.per = (uint32_t)kq.per;
	m.u.keyq_ok.hd = (uint32_t)hd;
	m.u.keyq_ok.starts = kq.first;
	m.u.keyq_ok.scales = kq.scales;
	m.u.keyq_ok.codes = kq.codes;
	rc = reply(c, &m);
	ckv_keyq_free(&kq);
	return rc;
}

static int h_stats(struct conn *c, const ckv_ctl_msg *req)
{
	ckv_ctl *ctl = c->ctl;
	ckv_ctl_msg m = { .hdr = { .version = c->version, .type = CKV_CTL_STATS_OK,
				   .id = req->hdr.id } };
	uint64_t f[CKV_CTL_ST_COUNT];
	ckv_engine_stats es;

	ckv_engine_get_stats(ctl->engine, &es);
	f[CKV_CTL_ST_ARENA_BYTES] = es.arena_bytes;
	f[CKV_CTL_ST_ARENA_USED] = es.arena_used;
	f[CKV_CTL_ST_SLOTS_USED] = es.slots_used;
	f[CKV_CTL_ST_PINNED] = es.pinned;
	f[CKV_CTL_ST_HITS] = es.hits;
	f[CKV_CTL_ST_MISSES] = es.misses;
	f[CKV_CTL_ST_EVICTIONS] = es.evictions;
	f[CKV_CTL_ST_BYTES_FROM_DISK] = es.bytes_from_disk;
	f[CKV_CTL_ST_DISK_READS] = es.disk_reads;
	f[CKV_CTL_ST_READAHEAD_ISSUED] = es.readahead_issued;
	f[CKV_CTL_ST_READAHEAD_USED] = es.readahead_used;
	f[CKV_CTL_ST_HINTS] = es.hints;
	f[CKV_CTL_ST_CHECKSUM_FAILURES] = es.checksum_failures;
	f[CKV_CTL_ST_IO_ERRORS] = es.io_errors;
	f[CKV_CTL_ST_CLIENTS] = atomic_load(&ctl->st_clients);
	f[CKV_CTL_ST_ACCEPTED] = atomic_load(&ctl->st_accepted);
	f[CKV_CTL_ST_REFUSED] = atomic_load(&ctl->st_refused);
	f[CKV_CTL_ST_MESSAGES] = atomic_load(&ctl->st_messages);
	f[CKV_CTL_ST_ERRORS] = atomic_load(&ctl->st_errors);
	f[CKV_CTL_ST_HOSTILE] = atomic_load(&ctl->st_hostile);
	f[CKV_CTL_ST_PINS_ALL] = atomic_load(&ctl->st_pins);
	pthread_mutex_lock(&c->lock);
	f[CKV_CTL_ST_MY_PINS] = c->npins;
	f[CKV_CTL_ST_MY_PINNED_BYTES] = c->pinned_bytes;
	f[CKV_CTL_ST_MY_INFLIGHT] = c->inflight;
	pthread_mutex_unlock(&c->lock);
	f[CKV_CTL_ST_MY_PREFIXES] = c->nopen;
	for (unsigned i = 0; i < CKV_CTL_ST_COUNT; i++)
		f[i] = htole64(f[i]);
	m.u.stats_ok.nfields = CKV_CTL_ST_COUNT;
	m.u.stats_ok.fields = f;
	return reply(c, &m);
}

/* Run one parsed request. 0, or -1 when the client was disconnected. */
static int conn_handle(struct conn *c, const ckv_ctl_msg *m)
{
	char tn[16];
	const char *what = ckv_ctl_type_name(m->hdr.type, tn);

	atomic_fetch_add(&c->ctl->st_messages, 1);
	if (m->hdr.type & CKV_CTL_REPLY)
		return hostile(c, m->hdr.id, EBADMSG, "%s: a server-to-client message sent by a client",
			       what);
	if (!c->version && m->hdr.type != CKV_CTL_HELLO)
		return hostile(c, m->hdr.id, EPROTO, "%s before HELLO", what);
	if (c->version && m->hdr.version != c->version)
		return hostile(c, m->hdr.id, EPROTO, "%s: header version %u, the connection speaks %u",
			       what, m->hdr.version, c->version);
	switch (m->hdr.type) {
	case CKV_CTL_HELLO: return h_hello(c, m);
	case CKV_CTL_MATCH: return h_match(c, m);
	case CKV_CTL_OPEN: return h_open(c, m);
	case CKV_CTL_CLOSE: return h_close(c, m);
	case CKV_CTL_GET: return h_get(c, m);
	case CKV_CTL_RELEASE: return h_release(c, m);
	case CKV_CTL_PREFETCH: return h_prefetch(c, m);
	case CKV_CTL_SCORE: return h_score(c, m);
	case CKV_CTL_DIGESTS: return h_digests(c, m);
	case CKV_CTL_STATS: return h_stats(c, m);
	case CKV_CTL_KEYQ: return h_keyq(c, m);
	default: return hostile(c, m->hdr.id, EBADMSG, "%s: not a request", what);
	}
}

/* Parse and run the complete messages in c->in. 0, or -1 when the client went. */
static int conn_process(struct conn *c)
{
	size_t off = 0;
	int rc = 0;

	while (c->fd >= 0) {
		char err[CTL_ERRLEN];
		ckv_ctl_msg m;
		int n = ckv_ctl_parse(c->in + off, c->in_len - off, &m, err, sizeof(err));

		if (n < 0) {
			uint32_t id = m.hdr.magic == CKV_CTL_MAGIC ? m.hdr.id : 0;

			return hostile(c, id, -n, "%s", err);
		}
		if (n == 0) {
			if (c->in_len - off >= CKV_CTL_HDR && m.hdr.length > c->ctl->lim.max_msg)
				return hostile(c, m.hdr.id, EMSGSIZE,
					       "header: length %u exceeds this server's max_msg %u",
					       m.hdr.length, c->ctl->lim.max_msg);
			break;
		}
		if (m.hdr.length > c->ctl->lim.max_msg)
			return hostile(c, m.hdr.id, EMSGSIZE,
				       "header: length %u exceeds this server's max_msg %u", m.hdr.length,
				       c->ctl->lim.max_msg);
		rc = conn_handle(c, &m);
		if (rc < 0)
			return -1;
		off += (size_t)n;
	}
	if (c->fd < 0)
		return -1;
	if (off) {
		memmove(c->in, c->in + off, c->in_len - off);
		c->in_len -= off;
	}
	if (!c->in_len && c->in_cap > CTL_IN_KEEP) {
		free(c->in);
		c->in = NULL;
		c->in_cap = 0;
	}
	return 0;
}

/* Bytes the input buffer should have room for: the message in progress, or a chunk. */
static size_t in_want(const struct conn *c)
{
	size_t want = CTL_READ_CHUNK;

	if (c->in_len >= CKV_CTL_HDR) {
		uint32_t len = ckv_ctl_u32(c->in + 8, 0); /* checked by the parser already */
		size_t whole = CKV_CTL_HDR + (size_t)len;

		if (whole > c->in_len && whole - c->in_len > want)
			want = whole - c->in_len;
	}
	return want;
}

static void conn_read(struct conn *c)
{
	size_t budget = CTL_READ_BUDGET;

	while (c->fd >= 0 && budget > 0) {
		size_t want = in_want(c);
		ssize_t n;

		if (c->in_cap - c->in_len < want) {
			size_t ncap = c->in_len + want;
			uint8_t *p = realloc(c->in, ncap);

			if (!p) {
				clog_(c->ctl, "ckv ctl: client pid %d: no memory for input; disconnected",
				      (int)c->pid);
				conn_disconnect(c, false);
				return;
			}
			c->in = p;
			c->in_cap = ncap;
		}
		n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				conn_disconnect(c, false);
			return;
		}
		if (n == 0) {
			if (c->in_len)
				clog_(c->ctl, "ckv ctl: client pid %d: stream ended inside a message (%zu bytes)",
				      (int)c->pid, c->in_len);
			conn_disconnect(c, false);
			return;
		}
		c->in_len += (size_t)n;
		budget = (size_t)n < budget ? budget - (size_t)n : 0;
		if (conn_process(c) < 0)
			return;
	}
}

/* ---- accept ---------------------------------------------------------------- */

static void refuse(ckv_ctl *ctl, int fd, int err, const char *text)
{
	ckv_ctl_buf b = { 0 };
	ckv_ctl_msg m = { .hdr = { .version = CKV_CTL_VERSION_MIN, .type = CKV_CTL_ERROR } };

	m.u.error.err = err;
	m.u.error.flags = CKV_CTL_ERR_FATAL;
	m.u.error.text = text;
	m.u.error.text_len = (uint16_t)strlen(text);
	if (ckv_ctl_encode(&b, &m) == 0 && send(fd, b.p, b.len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
		/* nothing more to do: the connection is being refused anyway */
	}
	ckv_ctl_buf_free(&b);
	close(fd);
	atomic_fetch_add(&ctl->st_refused, 1);
	atomic_fetch_add(&ctl->st_errors, 1);
}

static void ctl_accept(ckv_ctl *ctl)
{
	for (;;) {
		struct ucred cred;
		socklen_t cl = sizeof(cred);
		struct epoll_event ev;
		struct conn *c;
		int fd = accept4(ctl->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK) {
				if (ctl->accept_errors++ % 1000 == 0)
					clog_(ctl, "ckv ctl: accept: %s", strerror(errno));
				usleep(1000); /* EMFILE: do not spin on the pending connection */
			}
			return;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) {
			refuse(ctl, fd, EACCES, "connection refused: peer credentials unknown");
			continue;
		}
		if (!ctl->lim.allow_other && cred.uid != geteuid() && cred.uid != 0) {
			clog_(ctl, "ckv ctl: refused pid %d uid %u: not the daemon's uid (%u) or root",
			      (int)cred.pid, (unsigned)cred.uid, (unsigned)geteuid());
			refuse(ctl, fd, EACCES,
			       "connection refused: uid not allowed (mount with allow_other to share)");
			continue;
		}
		if (ctl->nconns >= ctl->lim.max_clients) {
			clog_(ctl, "ckv ctl: refused pid %d: %u clients connected", (int)cred.pid,
			      ctl->nconns);
			refuse(ctl, fd, EBUSY, "connection refused: too many clients");
			continue;
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			refuse(ctl, fd, ENOMEM, "connection refused: out of memory");
			continue;
		}
		c->ctl = ctl;
		atomic_init(&c->refs, 1);
		c->fd = fd;
		c->pid = cred.pid;
		c->uid = cred.uid;
		c->pin_free = CTL_NO_PIN;
		c->hello_due = mono_ns() + (int64_t)ctl->lim.hello_ms * 1000000;
		pthread_mutex_init(&c->lock, NULL);
		c->events = EPOLLIN | EPOLLRDHUP;
		ev.events = c->events;
		ev.data.ptr = c;
		if (epoll_ctl(ctl->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			pthread_mutex_destroy(&c->lock);
			free(c);
			refuse(ctl, fd, EIO, "connection refused: epoll");
			continue;
		}
		c->next = ctl->conns;
		if (ctl->conns)
			ctl->conns->prev = c;
		ctl->conns = c;
		ctl->nconns++;
		atomic_fetch_add(&ctl->st_clients, 1);
		atomic_fetch_add(&ctl->st_accepted, 1);
	}
}

/* ---- the server thread --------------------------------------------------------- */

/*
 * Close the connections whose HELLO is overdue (a socket held open without
 * a word would hold one of max_clients for good); return the milliseconds
 * until the next deadline, or -1 when no connection is waiting for one.
 */
static int hello_sweep(ckv_ctl *ctl)
{
	int64_t now = mono_ns(), next = -1;

	for (struct conn *c = ctl->conns, *nx; c; c = nx) {
		nx = c->next;
		if (c->version || c->fd < 0)
			continue;
		if (c->hello_due <= now) {
			hostile(c, 0, ETIMEDOUT, "no HELLO within %u ms of connecting", ctl->lim.hello_ms);
			continue;
		}
		if (next < 0 || c->hello_due - now < next)
			next = c->hello_due - now;
	}
	return next < 0 ? -1 : (int)((next + 999999) / 1000000);
}

static void *ctl_main(void *arg)
{
	ckv_ctl *ctl = arg;
	struct epoll_event evs[CTL_MAX_EVENTS];

	while (!atomic_load(&ctl->stopping)) {
		int n = epoll_wait(ctl->epfd, evs, CTL_MAX_EVENTS, hello_sweep(ctl));

		if (n < 0) {
			if (errno != EINTR) {
				clog_(ctl, "ckv ctl: epoll_wait: %s", strerror(errno));
				usleep(10000);
			}
			continue;
		}
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;
			uint32_t e = evs[i].events;

			if (p == &ctl->lfd) {
				ctl_accept(ctl);
			} else if (p == &ctl->evfd) {
				eventfd_t v;

				eventfd_read(ctl->evfd, &v);
				atomic_store(&ctl->kicked, false);
				for (struct conn *c = ctl->conns, *next; c; c = next) {
					next = c->next;
					if (conn_drain(c) == 0)
						conn_flush(c);
				}
			} else {
				struct conn *c = p;

				if (c->fd < 0)
					continue; /* disconnected earlier in this batch */
				if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
					conn_read(c);
				if (c->fd >= 0)
					conn_flush(c);
			}
		}
		bury_zombies(ctl);
	}
	while (ctl->conns)
		conn_disconnect(ctl->conns, true);
	bury_zombies(ctl);
	return NULL;
}

/* ---- start / stop ------------------------------------------------------------- */

/* Make sock_path free for us: a stale socket is removed, a live one or another file refused. */
static int clear_path(ckv_ctl *ctl, const struct sockaddr_un *sa)
{
	struct stat st;
	int fd, rc;

	if (lstat(sa->sun_path, &st) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISSOCK(st.st_mode)) {
		clog_(ctl, "ckv ctl: %s exists and is not a socket", sa->sun_path);
		return -EEXIST;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	rc = connect(fd, (const struct sockaddr *)sa, sizeof(*sa));
	close(fd);
	if (rc == 0) {
		clog_(ctl, "ckv ctl: %s: another server is listening there", sa->sun_path);
		return -EADDRINUSE;
	}
	if (unlink(sa->sun_path) < 0 && errno != ENOENT)
		return -errno;
	return 0;
}

static void apply_defaults(ckv_ctl_limits *l, uint64_t arena)
{
	if (!l->max_clients)
		l->max_clients = CKV_CTL_DEFAULT_CLIENTS;
	if (!l->max_pins)
		l->max_pins = CKV_CTL_DEFAULT_PINS;
	if (!l->max_pinned_bytes)
		l->max_pinned_bytes = arena / 2 ? arena / 2 : 1;
	if (!l->max_prefixes)
		l->max_prefixes = CKV_CTL_DEFAULT_PREFIXES;
	if (l->max_prefixes > CTL_HANDLE_IDX)
		l->max_prefixes = CTL_HANDLE_IDX;
	if (!l->max_inflight)
		l->max_inflight = CKV_CTL_DEFAULT_INFLIGHT;
	if (!l->hello_ms)
		l->hello_ms = CKV_CTL_DEFAULT_HELLO_MS;
	if (!l->max_msg || l->max_msg > CKV_CTL_MAX_PAYLOAD)
		l->max_msg = CKV_CTL_MAX_PAYLOAD;
	if (l->max_msg < CKV_CTL_MIN_MSG)
		l->max_msg = CKV_CTL_MIN_MSG;
	if (!l->log)
		l->log = default_log;
}

int ckv_ctl_start(ckv_store *s, ckv_engine *e, const char *sock_path, const ckv_ctl_limits *lim,
		  ckv_ctl **out)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct epoll_event ev;
	char proc[64];
	struct stat st;
	ckv_ctl *ctl;
	int rc;

	if (!s || !e || !sock_path || !out)
		return -EINVAL;
	if (strlen(sock_path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	ctl = calloc(1, sizeof(*ctl));
	if (!ctl)
		return -ENOMEM;
	ctl->store = s;
	ctl->engine = e;
	if (lim)
		ctl->lim = *lim;
	ctl->arena_size = ckv_engine_arena_size(e);
	apply_defaults(&ctl->lim, ctl->arena_size);
	ctl->out_limit = 4ull * ctl->lim.max_msg > CTL_OUT_FLOOR ? 4ull * ctl->lim.max_msg
								  : CTL_OUT_FLOOR;
	ctl->lfd = ctl->epfd = ctl->evfd = ctl->arena_ro = -1;
	snprintf(ctl->path, sizeof(ctl->path), "%s", sock_path);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
	pthread_mutex_init(&ctl->lock, NULL);
	pthread_cond_init(&ctl->drained, NULL);

	/* The arena, read-only: a new open file description without write access. */
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", ckv_engine_arena_fd(e));
	ctl->arena_ro = open(proc, O_RDONLY | O_CLOEXEC);
	if (ctl->arena_ro < 0) {
		rc = -errno;
		clog_(ctl, "ckv ctl: cannot reopen the arena read-only (%s): %s", proc, strerror(-rc));
		goto out_free;
	}
	/* No reopening it for writing through /proc/<pid>/fd either (PROTOCOL.md §3.1). */
	if (fchmod(ckv_engine_arena_fd(e), 0400) < 0)
		clog_(ctl, "ckv ctl: chmod of the arena memfd: %s", strerror(errno));

	rc = clear_path(ctl, &sa);
	if (rc < 0)
		goto out_close_arena;
	ctl->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (ctl->lfd < 0) {
		rc = -errno;
		goto out_close_arena;
	}
	if (bind(ctl->lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rc = -errno;
		clog_(ctl, "ckv ctl: bind %s: %s", sock_path, strerror(-rc));
		goto out_close_listen;
	}
	/* Before listen(): nobody can connect while the mode is still the umask's. */
	if (chmod(sock_path, ctl->lim.allow_other ? 0666 : 0600) < 0 || stat(sock_path, &st) < 0) {
		rc = -errno;
		goto out_unlink;
	}
	ctl->sock_dev = st.st_dev;
	ctl->sock_ino = st.st_ino;
	if (listen(ctl->lfd, CTL_BACKLOG) < 0) {
		rc = -errno;
		goto out_unlink;
	}

	ctl->epfd = epoll_create1(EPOLL_CLOEXEC);
	ctl->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (ctl->epfd < 0 || ctl->evfd < 0) {
		rc = -errno;
		goto out_close_ep;
	}
	ev.events = EPOLLIN;
	ev.data.ptr = &ctl->lfd;
	if (epoll_ctl(ctl->epfd, EPOLL_CTL_ADD, ctl->lfd, &ev) < 0) {
		rc = -errno;
		goto out_close_ep;
	}
	ev.data.ptr = &ctl->evfd;
	if (epoll_ctl(ctl->epfd, EPOLL_CTL_ADD, ctl->evfd, &ev) < 0) {
		rc = -errno;
		goto out_close_ep;
	}
	rc = pthread_create(&ctl->thread, NULL, ctl_main, ctl);
	if (rc) {
		rc = -rc;
		goto out_close_ep;
	}
	*out = ctl;
	return 0;

out_close_ep:
	if (ctl->evfd >= 0)
		close(ctl->evfd);
	if (ctl->epfd >= 0)
		close(ctl->epfd);
out_unlink:
	unlink(sock_path);
out_close_listen:
	close(ctl->lfd);
out_close_arena:
	close(ctl->arena_ro);
out_free:
	pthread_cond_destroy(&ctl->drained);
	pthread_mutex_destroy(&ctl->lock);
	free(ctl);
	return rc;
}

void ckv_ctl_stop(ckv_ctl *ctl)
{
	struct stat st;

	if (!ctl)
		return;
	/* No new clients: the path goes first (if a successor has not replaced it). */
	if (stat(ctl->path, &st) == 0 && st.st_dev == ctl->sock_dev && st.st_ino == ctl->sock_ino)
		unlink(ctl->path);
	atomic_store(&ctl->stopping, true);
	eventfd_write(ctl->evfd, 1);
	pthread_join(ctl->thread, NULL); /* every client disconnected, pins released */

	/* GETs still in the engine: their callbacks release the chunks. */
	pthread_mutex_lock(&ctl->lock);
	while (ctl->gets_inflight)
		pthread_cond_wait(&ctl->drained, &ctl->lock);
	pthread_mutex_unlock(&ctl->lock);

	close(ctl->lfd);
	close(ctl->epfd);
	close(ctl->evfd);
	close(ctl->arena_ro);
	pthread_cond_destroy(&ctl->drained);
	pthread_mutex_destroy(&ctl->lock);
	free(ctl);
}

void ckv_ctl_stats(ckv_ctl *ctl, struct ckv_ctl_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->clients = atomic_load(&ctl->st_clients);
	st->accepted = atomic_load(&ctl->st_accepted);
	st->refused = atomic_load(&ctl->st_refused);
	st->messages = atomic_load(&ctl->st_messages);
	st->errors = atomic_load(&ctl->st_errors);
	st->hostile = atomic_load(&ctl->st_hostile);
	st->disconnects = atomic_load(&ctl->st_disconnects);
	st->pins = atomic_load(&ctl->st_pins);
	pthread_mutex_lock(&ctl->lock);
	st->gets_inflight = ctl->gets_inflight;
	pthread_mutex_unlock(&ctl->lock);
}
