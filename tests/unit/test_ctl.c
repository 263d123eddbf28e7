/*
 * test_ctl.c — the control socket end to end: a server (ckvfs/ctl.c) in this
 * process on a temporary store and engine, clients through
 * ckv_source_remote (gpu/client.c) and through raw protocol messages.
 *
 * Covers: HELLO and the read-only arena (mprotect, mmap PROT_WRITE, reopen
 * and a write from a child all refused), socket path resolution (socket,
 * .ckv/ctl symlink, default path), stale / live / foreign socket files,
 * MATCH against the store, OPEN / CLOSE, GETs of random chunk sets of KV, K
 * and V parts compared byte for byte with the published data (also from
 * several threads), RELEASE, PREFETCH, SCORE, DIGESTS against digest.bin and
 * recomputed means, limits (pins, pinned bytes, prefixes) with the client
 * working again afterwards, a client SIGKILLed while holding pins, a client
 * gone with GETs in flight, and hostile clients (garbage, truncated, huge,
 * bad version, unknown type, bad handle, chunk out of range, overflowing
 * counts, forged token, ...) each answered with a fatal ERROR and
 * disconnected while a good client keeps working.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckv_ctl.h"
#include "ckv_ctl_msg.h"
#include "ckv_engine.h"
#include "ckv_pview.h"
#include "ckv_store.h"
#include "source.h"

#include "check.h"

/* ---- data ------------------------------------------------------------------ */

static ckv_geom geom; /* fp32, 4 layers, 4 kv heads, head_dim 60, c 16: padded chunks */

struct pfx {
	const uint32_t *tokens;
	uint32_t n, chunks;
	ckv_hash h;
	uint32_t pid; /* on the main client */
};

static float val(uint32_t l, uint32_t pos, uint32_t tok, uint32_t kv, uint32_t h, uint32_t d)
{
	return (float)((l * 131u + pos * 7u + kv * 3u + h * 5u + d) % 1000u) / 8.0f +
	       (float)(tok % 17u);
}

/* Chunk j of layer l of a prefix of n tokens, as published. */
static void expect_chunk(uint32_t l, uint32_t j, uint32_t n, const uint32_t *tokens, uint8_t *out)
{
	uint32_t H = geom.kv_heads, D = geom.head_dim, c = geom.chunk_tokens;
	float *f = (float *)out;

	memset(out, 0, geom.chunk_bytes);
	for (uint32_t kv = 0; kv < 2; kv++)
		for (uint32_t h = 0; h < H; h++)
			for (uint32_t t = 0; t < c; t++) {
				uint32_t pos = j * c + t;

				if (pos >= n)
					continue;
				for (uint32_t d = 0; d < D; d++)
					f[(size_t)kv * H * c * D + ((size_t)h * c + t) * D + d] =
						val(l, pos, tokens[pos], kv, h, d);
			}
}

struct fill_arg {
	const uint32_t *tokens;
	uint32_t n;
};

static int fill(void *arg, uint32_t layer, uint32_t first, uint32_t count, void *buf)
{
	const struct fill_arg *a = arg;

	for (uint32_t i = 0; i < count; i++)
		expect_chunk(layer, first + i, a->n, a->tokens, (uint8_t *)buf + (size_t)i * geom.chunk_bytes);
	return 0;
}

static uint64_t rnd_state = 0x1234567;
static uint64_t rnd(void)
{
	uint64_t z = (rnd_state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- completions ------------------------------------------------------------- */

struct coll {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint32_t n, done;
	uint64_t *off, *len, *tok;
	int *rc;
	uint8_t *hits;
	bool dup;
};

static void coll_init(struct coll *c, uint32_t n)
{
	memset(c, 0, sizeof(*c));
	pthread_mutex_init(&c->mu, NULL);
	pthread_cond_init(&c->cv, NULL);
	c->n = n;
	c->off = calloc(n + 1, sizeof(*c->off));
	c->len = calloc(n + 1, sizeof(*c->len));
	c->tok = calloc(n + 1, sizeof(*c->tok));
	c->rc = calloc(n + 1, sizeof(*c->rc));
	c->hits = calloc(n + 1, 1);
	CHECK(c->off && c->len && c->tok && c->rc && c->hits);
}

static void coll_free(struct coll *c)
{
	free(c->off);
	free(c->len);
	free(c->tok);
	free(c->rc);
	free(c->hits);
	pthread_cond_destroy(&c->cv);
	pthread_mutex_destroy(&c->mu);
}

static void coll_cb(void *arg, uint32_t i, uint64_t off, uint64_t len, uint64_t token, int rc)
{
	struct coll *c = arg;

	pthread_mutex_lock(&c->mu);
	if (i >= c->n || c->hits[i]) {
		c->dup = true;
	} else {
		c->hits[i] = 1;
		c->off[i] = off;
		c->len[i] = len;
		c->tok[i] = token;
		c->rc[i] = rc;
		c->done++;
	}
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
}

static void coll_wait(struct coll *c)
{
	struct timespec dl;

	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 20;
	pthread_mutex_lock(&c->mu);
	while (c->done < c->n)
		CHECK(pthread_cond_timedwait(&c->cv, &c->mu, &dl) == 0);
	pthread_mutex_unlock(&c->mu);
	CHECK(!c->dup);
}

/* ---- helpers on a source -------------------------------------------------------- */

static uint64_t part_bytes(int part)
{
	return part == CKV_SRC_KV ? geom.chunk_bytes : geom.half_bytes;
}

/* Get chunks of a layer part, check every byte, release. */
static void get_verify(ckv_source *s, const struct pfx *p, uint32_t layer, int part,
		       const uint32_t *chunks, uint32_t n)
{
	uint8_t *want = malloc(geom.chunk_bytes);
	struct coll c;

	CHECK(want);
	coll_init(&c, n);
	CHECK_RC(s->ops->get(s, p->pid, layer, (enum ckv_source_part)part, chunks, n, coll_cb, &c));
	coll_wait(&c);
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *src = (const uint8_t *)s->arena + c.off[i];
		uint64_t skip = part == CKV_SRC_V ? geom.half_bytes : 0;

		if (c.rc[i] != 0) {
			fprintf(stderr, "get: chunk %u: rc %d (%s) %s\n", chunks[i], c.rc[i],
				strerror(-c.rc[i]), s->err);
			exit(1);
		}
		CHECK(c.len[i] == part_bytes(part));
		CHECK(c.off[i] + c.len[i] <= s->arena_size);
		CHECK(c.tok[i] != 0);
		expect_chunk(layer, chunks[i], p->n, p->tokens, want);
		if (memcmp(src, want + skip, c.len[i]) != 0) {
			fprintf(stderr, "get: layer %u chunk %u part %d: bytes differ\n", layer, chunks[i],
				part);
			exit(1);
		}
	}
	s->ops->release(s, c.tok, n);
	coll_free(&c);
	free(want);
}

static void random_gets(ckv_source *s, const struct pfx *p, int rounds, uint32_t maxn)
{
	uint32_t *chunks = malloc(sizeof(*chunks) * maxn);

	CHECK(chunks);
	for (int r = 0; r < rounds; r++) {
		uint32_t n = 1 + (uint32_t)(rnd() % maxn);
		uint32_t layer = (uint32_t)(rnd() % geom.layers);
		int part = (int)(rnd() % 3);

		for (uint32_t i = 0; i < n; i++)
			chunks[i] = (uint32_t)(rnd() % p->chunks); /* repeats allowed */
		get_verify(s, p, layer, part, chunks, n);
	}
	free(chunks);
}

/* Wait (up to 10 s) until the engine has no pinned slot and the server no pins. */
static void wait_unpinned(ckv_engine *e, ckv_ctl *ctl)
{
	double dl = now_s() + 10;
	ckv_engine_stats es;
	struct ckv_ctl_stats cs;

	for (;;) {
		ckv_engine_get_stats(e, &es);
		ckv_ctl_stats(ctl, &cs);
		if (es.pinned == 0 && cs.pins == 0 && cs.gets_inflight == 0)
			return;
		if (now_s() > dl) {
			fprintf(stderr, "still pinned: engine %llu, ctl %llu, gets %llu\n",
				(unsigned long long)es.pinned, (unsigned long long)cs.pins,
				(unsigned long long)cs.gets_inflight);
			exit(1);
		}
		sleep_ms(5);
	}
}

/* ---- raw protocol clients --------------------------------------------------------- */

static int raw_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = 10 };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	CHECK(fd >= 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	CHECK(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	return fd;
}

static void raw_bytes(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;

	while (n) {
		ssize_t k = send(fd, b, n, MSG_NOSIGNAL);

		if (k <= 0)
			return; /* the server may already have hung up */
		b += k;
		n -= (size_t)k;
	}
}

static void raw_send(int fd, ckv_ctl_msg *m)
{
	ckv_ctl_buf b = { 0 };

	if (!m->hdr.version)
		m->hdr.version = 1; /* what raw_hello negotiates */
	CHECK_RC(ckv_ctl_encode(&b, m));
	raw_bytes(fd, b.p, b.len);
	ckv_ctl_buf_free(&b);
}

static int recv_exact(int fd, uint8_t *p, size_t n)
{
	while (n) {
		ssize_t k = recv(fd, p, n, 0);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* One message into buf (cap bytes); its type, or -1 at EOF. */
static int raw_recv(int fd, uint8_t *buf, size_t cap, ckv_ctl_msg *m)
{
	char err[256];
	uint32_t len;

	if (recv_exact(fd, buf, CKV_CTL_HDR) < 0)
		return -1;
	len = ckv_ctl_u32(buf + 8, 0);
	CHECK(CKV_CTL_HDR + (size_t)len <= cap);
	CHECK(recv_exact(fd, buf + CKV_CTL_HDR, len) == 0);
	if (ckv_ctl_parse(buf, CKV_CTL_HDR + len, m, err, sizeof(err)) <= 0) {
		fprintf(stderr, "raw: bad message from the server: %s\n", err);
		exit(1);
	}
	return m->hdr.type;
}

/* HELLO offering versions 1..top; the server must pick top. */
static void raw_hello_v(int fd, uint16_t top)
{
	uint16_t v[] = { 1, 2 };
	ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_HELLO, .id = 1 } };
	uint8_t buf[4096];

	m.u.hello.nversions = top;
	m.u.hello.versions = v;
	raw_send(fd, &m);
	CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_HELLO_OK);
	CHECK(m.u.hello_ok.version == top && (m.u.hello_ok.flags & CKV_CTL_HELLO_ARENA_FD));
}

static void raw_hello(int fd)
{
	raw_hello_v(fd, 1);
}

static uint32_t raw_open(int fd, const ckv_hash *h)
{
	ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_OPEN, .id = 2 } };
	uint8_t buf[4096];

	memcpy(m.u.open.hash, h->b, 16);
	raw_send(fd, &m);
	CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_OPEN_OK);
	return m.u.open_ok.handle;
}

/* The next message is a fatal ERROR with err, then the server hangs up. */
static void expect_fatal(int fd, int err, const char *what)
{
	uint8_t *buf = malloc(CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD);
	ckv_ctl_msg m;
	int t;

	CHECK(buf);
	/* skip replies to what was valid before the bad message */
	while ((t = raw_recv(fd, buf, CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD, &m)) >= 0 && t != CKV_CTL_ERROR)
		;
	if (t != CKV_CTL_ERROR || m.u.error.err != err || !(m.u.error.flags & CKV_CTL_ERR_FATAL)) {
		fprintf(stderr, "%s: expected a fatal ERROR %d (%s), got type %d err %d\n", what, err,
			strerror(err), t, t == CKV_CTL_ERROR ? m.u.error.err : 0);
		exit(1);
	}
	printf("  hostile %-28s -> %s: %.*s\n", what, strerror(err), (int)m.u.error.text_len,
	       m.u.error.text);
	CHECK(raw_recv(fd, buf, CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD, &m) == -1); /* EOF */
	close(fd);
	free(buf);
}

/* ---- the client that is SIGKILLed (forked before any thread exists) ---------------- */

struct victim {
	pid_t pid;
	int go_w;    /* parent writes: socket path (256 bytes) and hash (16) */
	int ready_r; /* child writes 'R' once it holds its pins */
};

static void victim_main(int go_r, int ready_w)
{
	char path[256];
	ckv_hash h;
	ckv_source *s;
	ckv_manifest *mf;
	ckv_err e;
	uint32_t pid, chunks[20];
	struct coll c;

	if (read(go_r, path, sizeof(path)) != (ssize_t)sizeof(path) ||
	    read(go_r, h.b, 16) != 16)
		_exit(0); /* the parent went away */
	if (ckv_source_remote(path, &s, &e) || s->ops->open(s, &h, &mf, &pid))
		_exit(3);
	for (uint32_t i = 0; i < 20; i++)
		chunks[i] = i;
	coll_init(&c, 20);
	if (s->ops->get(s, pid, 1, CKV_SRC_KV, chunks, 20, coll_cb, &c))
		_exit(4);
	coll_wait(&c);
	for (int i = 0; i < 20; i++)
		if (c.rc[i])
			_exit(5);
	if (write(ready_w, "R", 1) != 1)
		_exit(6);
	for (;;)
		pause(); /* holding 20 pins until killed */
}

static void victim_fork(struct victim *v)
{
	int go[2], ready[2];

	CHECK(pipe(go) == 0 && pipe(ready) == 0);
	v->pid = fork();
	CHECK(v->pid >= 0);
	if (v->pid == 0) {
		close(go[1]);
		close(ready[0]);
		victim_main(go[0], ready[1]);
	}
	close(go[0]);
	close(ready[1]);
	v->go_w = go[1];
	v->ready_r = ready[0];
}

/* ---- read-only arena ------------------------------------------------------------------ */

static void segv_exit(int sig)
{
	(void)sig;
	_exit(42);
}

static void check_readonly(ckv_source *s)
{
	char link[64], tgt[256];
	int ro_fds = 0, status;
	pid_t pid;

	CHECK(s->arena_readonly);
	/* the mapping cannot be made writable */
	CHECK(mprotect(s->arena, 4096, PROT_READ | PROT_WRITE) == -1 && errno == EACCES);

	/* the descriptor the server hands out: no writable mapping, no writable reopen */
	for (int fd = 0; fd < 1024; fd++) {
		ssize_t n;
		void *p;

		snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
		n = readlink(link, tgt, sizeof(tgt) - 1);
		if (n <= 0)
			continue;
		tgt[n] = 0;
		if (!strstr(tgt, "memfd:ckv-arena") || (fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDONLY)
			continue;
		ro_fds++;
		p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		CHECK(p == MAP_FAILED && errno == EACCES);
		if (geteuid() != 0) {
			int w = open(link, O_RDWR | O_CLOEXEC);

			CHECK(w < 0 && errno == EACCES);
		} else {
			/* as root DAC does not apply: try as nobody, as a loader would run */
			pid_t kid = fork();
			int kst;

			CHECK(kid >= 0);
			if (kid == 0) {
				if (setgid(65534) || setuid(65534))
					_exit(2);
				prctl(PR_SET_DUMPABLE, 1); /* /proc/self stays ours after setuid */
				if (open(link, O_RDWR | O_CLOEXEC) >= 0)
					_exit(3);
				_exit(errno == EACCES ? 0 : 4);
			}
			CHECK(waitpid(kid, &kst, 0) == kid && WIFEXITED(kst));
			CHECK(WEXITSTATUS(kst) == 0);
		}
	}
	CHECK(ro_fds >= 1);

	/* a write through the mapping faults */
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		struct sigaction sa = { .sa_handler = segv_exit };

		sigaction(SIGSEGV, &sa, NULL);
		sigaction(SIGBUS, &sa, NULL);
		*(volatile char *)s->arena = 1;
		_exit(0);
	}
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 42) ||
	      (WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV));
	printf("read-only arena: mprotect, mmap(PROT_WRITE), reopen O_RDWR%s and a write all refused\n",
	       geteuid() == 0 ? " (as uid 65534)" : "");
}

/* ---- several threads on one client --------------------------------------------------- */

struct thr {
	ckv_source *s;
	const struct pfx *p;
	uint64_t seed;
};

static void *thr_main(void *arg)
{
	struct thr *t = arg;
	uint32_t chunks[24];
	uint64_t st = t->seed;

	for (int r = 0; r < 40; r++) {
		uint32_t n, layer;
		int part;

		st = st * 6364136223846793005ull + 1442695040888963407ull;
		n = 1 + (uint32_t)((st >> 33) % 24);
		layer = (uint32_t)((st >> 20) % geom.layers);
		part = (int)((st >> 10) % 3);
		for (uint32_t i = 0; i < n; i++) {
			st = st * 6364136223846793005ull + 1442695040888963407ull;
			chunks[i] = (uint32_t)((st >> 33) % t->p->chunks);
		}
		get_verify(t->s, t->p, layer, part, chunks, n);
	}
	return NULL;
}

/* ---- main ----------------------------------------------------------------------------- */

static void rm_rf(const char *dir)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "warning: could not remove %s\n", dir);
}

static int retention_count(void *arg, const char *key, uint32_t chunk, double importance,
			   double freq, int64_t last)
{
	(void)key;
	(void)chunk;
	(void)freq;
	(void)last;
	if (importance > 0)
		(*(int *)arg)++;
	return 0;
}

/*
 * ckv_ctl_find_path as another user (euid uid, in a child) for a
 * mountpoint whose socket sits in that user's /tmp/ckvfs-<uid>: 0 found,
 * 1 not found, 2 anything else.
 */
static int find_as(uid_t uid, const char *mnt, const char *want)
{
	pid_t pid = fork();
	int st;

	CHECK(pid >= 0);
	if (pid == 0) {
		char found[256];
		int rc;

		if (seteuid(uid) != 0)
			_exit(3);
		rc = ckv_ctl_find_path(mnt, found, sizeof(found));
		_exit(rc == 0 && !strcmp(found, want) ? 0 : rc == -ENOENT ? 1 : 2);
	}
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st));
	return WEXITSTATUS(st);
}

/*
 * The /tmp fallback is trusted only in a directory of the caller's alone,
 * as the daemon requires of its own: another user who made
 * /tmp/ckvfs-<uid> first, or left it open, cannot plant a socket there
 * that the loader would connect to (and map its arena from).
 */
static void check_tmp_trust(void)
{
	char base[] = "/tmp/ckv-trust-XXXXXX", mnt[64], def[256], tdir[32], tsock[100];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const uid_t uid = 50000 + (uid_t)(getpid() % 10000); /* a user of its own, no passwd entry needed */
	const char *name;
	int fd;

	snprintf(tdir, sizeof(tdir), "/tmp/ckvfs-%u", (unsigned)uid);
	if (geteuid() != 0 || access(tdir, F_OK) == 0) {
		printf("paths: the /tmp fallback's trust not checked (needs root and no %s)\n", tdir);
		return;
	}
	CHECK(mkdtemp(base) && chmod(base, 0755) == 0);
	snprintf(mnt, sizeof(mnt), "%s/mnt", base);
	CHECK(mkdir(mnt, 0755) == 0);
	CHECK_RC(ckv_ctl_default_path(mnt, def, sizeof(def)));
	name = strrchr(def, '/') + 1;
	snprintf(tsock, sizeof(tsock), "%s/%s", tdir, name);
	CHECK(mkdir(tdir, 0700) == 0);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", tsock);
	CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 && listen(fd, 1) == 0);
	CHECK(chown(tsock, uid, uid) == 0 && chown(tdir, uid, uid) == 0);
	CHECK(find_as(uid, mnt, tsock) == 0); /* its own 0700 directory */
	CHECK(chmod(tdir, 0777) == 0);
	CHECK(find_as(uid, mnt, tsock) == 1); /* open to others */
	CHECK(chmod(tdir, 0755) == 0 && chown(tdir, 0, 0) == 0);
	CHECK(find_as(uid, mnt, tsock) == 1); /* someone else's */
	close(fd);
	CHECK(unlink(tsock) == 0 && rmdir(tdir) == 0 && rmdir(mnt) == 0 && rmdir(base) == 0);
	printf("paths: the /tmp fallback only in the caller's own 0700 directory\n");
}

int main(void)
{
	char dir[] = "/tmp/ckv-test-ctl-XXXXXX", store_dir[128], sock[128], mnt[128], path[256];
	struct victim vic;
	ckv_store *st;
	ckv_engine *eng;
	ckv_ctl *ctl;
	ckv_source *s;
	ckv_err e;
	ckv_import_result r1, r2;
	struct pfx parent = { 0 }, child = { 0 };
	uint32_t *tokens, matched, lookups;
	ckv_hash h, h2;
	ckv_manifest *mf;
	ckv_engine_stats es0, es1;
	struct ckv_ctl_stats cs;
	struct stat sst;
	uint64_t hostile0;
	int nhostile = 0;
	ckv_ctl_limits lim = {
		.max_pins = 200,
		.max_pinned_bytes = 4ull << 20,
		.max_prefixes = 4,
		.max_inflight = 16,
		.max_msg = CKV_CTL_MIN_MSG, /* small: exercises the client's splitting */
	};

	signal(SIGPIPE, SIG_IGN);
	/* fork the victim before any thread exists */
	victim_fork(&vic);

	CHECK(mkdtemp(dir));
	snprintf(store_dir, sizeof(store_dir), "%s/store", dir);
	snprintf(sock, sizeof(sock), "%s/ctl.sock", dir);
	snprintf(mnt, sizeof(mnt), "%s/mnt", dir);

	/* ---- a store with two prefixes (the second extends the first: 2 extents) */
	memset(&geom, 0, sizeof(geom));
	snprintf(geom.model, sizeof(geom.model), "test/ctl");
	geom.dtype = CKV_DTYPE_FP32;
	geom.layers = 4;
	geom.kv_heads = 4;
	geom.head_dim = 60;
	geom.chunk_tokens = 16;
	CHECK_RC(ckv_geom_init(&geom, &e));
	CHECK(geom.half_bytes == 15360 && geom.chunk_bytes == 32768);
	tokens = malloc(sizeof(*tokens) * 2000);
	CHECK(tokens);
	for (uint32_t i = 0; i < 2000; i++)
		tokens[i] = (i * 2654435761u) ^ 77u;
	CHECK_RC(ckv_store_init(store_dir, &e));
	CHECK_RC(ckv_store_open(store_dir, &st, &e));
	{
		struct fill_arg a1 = { tokens, 1000 }, a2 = { tokens, 1300 };

		CHECK_RC(ckv_store_publish(st, &geom, tokens, 1000, fill, &a1, NULL, &r1, &e));
		CHECK_RC(ckv_store_publish(st, &geom, tokens, 1300, fill, &a2, NULL, &r2, &e));
		CHECK(r2.shared_chunks == 62);
	}
	parent = (struct pfx){ tokens, 1000, 63, r1.hash, 0 };
	child = (struct pfx){ tokens, 1300, 82, r2.hash, 0 };

	/* ---- engine and server */
	{
		ckv_engine_opts eo = { .arena_bytes = 32ull << 20, .queue_depth = 32, .no_direct = true };

		CHECK_RC(ckv_engine_open(&eo, &eng));
	}
	CHECK_RC(ckv_ctl_start(st, eng, sock, &lim, &ctl));
	CHECK(stat(sock, &sst) == 0 && S_ISSOCK(sst.st_mode) && (sst.st_mode & 0777) == 0600);
	CHECK(ckv_ctl_start(st, eng, sock, &lim, &(ckv_ctl *){ NULL }) == -EADDRINUSE);

	/* ---- HELLO, read-only arena */
	CHECK_RC(ckv_source_remote(sock, &s, &e));
	CHECK(s->arena_size == ckv_engine_arena_size(eng));
	check_readonly(s);

	/* ---- MATCH: the same answers as the store gives in-process */
	{
		uint32_t *q = malloc(sizeof(*q) * 1400);
		ckv_hash hl;
		uint32_t ml;

		CHECK(q);
		memcpy(q, tokens, sizeof(*q) * 1400);
		CHECK_RC(s->ops->match(s, &geom, q, 1400, &h, &matched));
		CHECK(matched == 1300 && ckv_hash_eq(&h, &child.h));
		q[1100] ^= 1; /* diverge inside the child's new chunks */
		CHECK_RC(s->ops->match(s, &geom, q, 1400, &h, &matched));
		CHECK_RC(ckv_store_match(st, &geom, q, 1400, &hl, &ml, &lookups));
		CHECK(matched == ml && ckv_hash_eq(&h, &hl) && matched >= 992 && matched < 1300);
		q[5] ^= 1; /* no match at all */
		CHECK_RC(s->ops->match(s, &geom, q, 1400, &h, &matched));
		CHECK(matched == 0);
		{
			ckv_geom bad = geom;

			bad.layers = 0;
			CHECK(s->ops->match(s, &bad, q, 10, &h, &matched) == -EINVAL);
			CHECK(strstr(s->err, "layers"));
		}
		{
			/* a geometry whose sizes overflow, sent raw: EINVAL, not fatal */
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_MATCH, .id = 5 } };
			uint8_t buf[4096];
			int fd = raw_connect(sock);

			raw_hello(fd);
			m.u.match.layers = 4;
			m.u.match.kv_heads = 1024;
			m.u.match.head_dim = 4096;
			m.u.match.chunk_tokens = 4096;
			m.u.match.dtype = CKV_DTYPE_FP32;
			m.u.match.model = "test/ctl";
			m.u.match.model_len = 8;
			m.u.match.ntokens = 16;
			m.u.match.tokens = q;
			raw_send(fd, &m);
			CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_ERROR);
			CHECK(m.u.error.err == EINVAL && !(m.u.error.flags & CKV_CTL_ERR_FATAL));
			m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_STATS, .id = 6 } };
			raw_send(fd, &m); /* the connection carries on */
			CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_STATS_OK);
			close(fd);
		}
		free(q);
		printf("match: 1300 of 1400, %u after a divergence (store agrees), 0, bad geometry -EINVAL\n",
		       ml);
	}

	/* ---- OPEN */
	CHECK_RC(s->ops->open(s, &parent.h, &mf, &parent.pid));
	CHECK(mf->tokens == 1000 && mf->chunks == 63 && ckv_hash_eq(&mf->hash, &parent.h));
	CHECK(mf->geom.chunk_bytes == geom.chunk_bytes && mf->geom.seed == geom.seed &&
	      !strcmp(mf->geom.model, "test/ctl") && mf->geom.layers == 4);
	ckv_manifest_free(mf);
	free(mf);
	CHECK_RC(s->ops->open(s, &child.h, &mf, &child.pid));
	CHECK(mf->tokens == 1300 && mf->chunks == 82);
	ckv_manifest_free(mf);
	free(mf);
	memset(&h, 0xab, sizeof(h));
	CHECK(s->ops->open(s, &h, &mf, &(uint32_t){ 0 }) == -ENOENT);
	CHECK(strstr(s->err, "not stored"));
	printf("open: parent (63 chunks), child (82 chunks, 2 extents), unknown -ENOENT\n");

	/* ---- GET: random chunk sets, every part, byte for byte */
	ckv_engine_get_stats(eng, &es0);
	{
		uint32_t all[82];

		for (uint32_t i = 0; i < 82; i++)
			all[i] = i;
		for (uint32_t l = 0; l < geom.layers; l++)
			for (int part = 0; part < 3; part++) {
				get_verify(s, &child, l, part, all, 82);
				get_verify(s, &parent, l, part, all, 63);
			}
	}
	random_gets(s, &child, 150, 64);
	random_gets(s, &parent, 50, 64);
	wait_unpinned(eng, ctl);
	ckv_engine_get_stats(eng, &es1);
	printf("get: every chunk of every layer and part of both prefixes, 200 random sets; "
	       "hits %llu misses %llu\n",
	       (unsigned long long)(es1.hits - es0.hits), (unsigned long long)(es1.misses - es0.misses));

	/* several threads on one connection */
	{
		pthread_t tid[4];
		struct thr t[4];

		for (int i = 0; i < 4; i++) {
			t[i] = (struct thr){ s, i % 2 ? &child : &parent, 1000u + (uint64_t)i };
			CHECK(pthread_create(&tid[i], NULL, thr_main, &t[i]) == 0);
		}
		for (int i = 0; i < 4; i++)
			pthread_join(tid[i], NULL);
		wait_unpinned(eng, ctl);
		printf("get: 4 threads x 40 random sets on one connection\n");
	}

	/* local argument checks */
	{
		uint32_t bad[1] = { 82 };
		struct coll c;

		coll_init(&c, 1);
		CHECK(s->ops->get(s, child.pid, 0, CKV_SRC_KV, bad, 1, coll_cb, &c) == -EINVAL);
		CHECK(s->ops->get(s, child.pid, 4, CKV_SRC_KV, bad, 0, coll_cb, &c) == 0);
		CHECK(s->ops->get(s, 0xdead, 0, CKV_SRC_KV, bad, 1, coll_cb, &c) == -EBADF);
		CHECK(c.done == 0);
		coll_free(&c);
	}

	/* ---- PREFETCH, then the GET finds the chunks */
	{
		uint32_t ch[40];

		/* evict nothing needed: a layer part not read yet is impossible, so use counters */
		for (uint32_t i = 0; i < 40; i++)
			ch[i] = 40 + i;
		ckv_engine_get_stats(eng, &es0);
		CHECK_RC(s->ops->prefetch(s, child.pid, 2, CKV_SRC_V, ch, 40));
		/* a round trip orders the PREFETCH before this point on the server */
		CHECK_RC(s->ops->match(s, &geom, tokens, 16, &h, &matched));
		ckv_engine_get_stats(eng, &es1);
		CHECK(es1.hints == es0.hints + 1);
		get_verify(s, &child, 2, CKV_SRC_V, ch, 40);
		printf("prefetch: hint counted, chunks then served\n");
	}

	/* ---- SCORE */
	{
		uint32_t ch[3] = { 0, 10, 81 };
		float sc[3] = { 1.5f, 2.0f, 0.25f }, nan_sc[1] = { NAN };
		int before = 0, after = 0;

		CHECK_RC(ckv_engine_retention_each(eng, retention_count, &before));
		ckv_engine_get_stats(eng, &es0);
		CHECK_RC(s->ops->score(s, child.pid, 3, ch, sc, 3));
		CHECK(s->ops->score(s, child.pid, 3, ch, nan_sc, 1) == -EINVAL);
		CHECK_RC(s->ops->match(s, &geom, tokens, 16, &h, &matched)); /* round trip */
		ckv_engine_get_stats(eng, &es1);
		CHECK(es1.hints > es0.hints);
		CHECK_RC(ckv_engine_retention_each(eng, retention_count, &after));
		/* layer 3 was fetched in every part: each scored chunk is credited in 3 records */
		CHECK(after >= before + 3);
		printf("score: %d retention records gained importance; NaN refused locally\n",
		       after - before);
	}

	/* ---- DIGESTS: vs the store's digest.bin and vs means recomputed from the data */
	{
		size_t per = (size_t)geom.kv_heads * geom.head_dim;
		float *got = malloc(sizeof(float) * per * 82), *ref = malloc(sizeof(float) * per * 82);
		float *calc = malloc(sizeof(float) * per);
		uint8_t *chunk = malloc(geom.chunk_bytes);
		ckv_pview *v;

		CHECK(got && ref && calc && chunk);
		for (uint32_t l = 0; l < geom.layers; l++) {
			CHECK_RC(s->ops->digests(s, child.pid, l, got));
			CHECK_RC(ckv_pview_open(st, eng, &child.h, &v, &e));
			CHECK_RC(ckv_pview_digests(v, l, ref));
			ckv_pview_put(v);
			CHECK(memcmp(got, ref, sizeof(float) * per * 82) == 0);
			for (uint32_t j = 0; j < 82; j++) {
				uint32_t valid = (j + 1) * 16 <= 1300 ? 16 : 1300 - j * 16;

				expect_chunk(l, j, 1300, tokens, chunk);
				ckv_chunk_digest(&geom, chunk, valid, calc);
				CHECK(memcmp(calc, got + j * per, sizeof(float) * per) == 0);
			}
		}
		free(got);
		free(ref);
		free(calc);
		free(chunk);
		printf("digests: 4 layers x 82 chunks x %zu floats (2 requests each at max_msg 64 KiB) "
		       "equal digest.bin and the recomputed means\n", per);
	}

	/* ---- KEYQ: the client's key copy, in several requests, vs the store's through a pview */
	{
		size_t HD = (size_t)geom.kv_heads * geom.head_dim, slots = (size_t)16 * geom.kv_heads * geom.head_dim;
		float *a = malloc(sizeof(float) * slots), *b = malloc(sizeof(float) * slots);
		char err[256];
		uint32_t parts = 0;
		ckv_pview *v;

		CHECK(a && b && s->ops->keyq_r);
		for (uint32_t l = 0; l < geom.layers; l++) {
			struct ckv_keyq got, ref;

			CHECK_RC(s->ops->keyq_r(s, child.pid, l, &got, err, sizeof(err)));
			CHECK_RC(ckv_pview_open(st, eng, &child.h, &v, &e));
			CHECK(ckv_pview_keyq(v, l, 0, 82, &ref, err, sizeof(err)) == 0);
			ckv_pview_put(v);
			CHECK(got.bits == CKV_KEYQ_BITS && got.bits == ref.bits && got.per == ref.per);
			CHECK(got.first[0] == 0 && got.first[got.nparts] == 82 && got.nparts > ref.nparts);
			CHECK(memcmp(got.codes, ref.codes, got.per * 82) == 0);
			parts = got.nparts;
			for (uint32_t j = 0; j < 82; j++) {
				uint32_t x = 0, y = 0;

				while (got.first[x + 1] <= j)
					x++;
				while (ref.first[y + 1] <= j)
					y++;
				ckv_keyq_decode(&geom, got.bits, got.scales + 2 * HD * x, got.codes + j * got.per, a);
				ckv_keyq_decode(&geom, ref.bits, ref.scales + 2 * HD * y, ref.codes + j * ref.per, b);
				CHECK(memcmp(a, b, sizeof(float) * slots) == 0);
			}
			ckv_keyq_free(&got);
			ckv_keyq_free(&ref);
		}
		{
			struct ckv_keyq k;

			CHECK(s->ops->keyq_r(s, child.pid, 9, &k, err, sizeof(err)) == -EINVAL);
			CHECK(strstr(err, "layer 9"));
			CHECK(s->ops->keyq_r(s, 0xdead, 0, &k, err, sizeof(err)) == -EBADF);
		}
		free(a);
		free(b);
		/* a range whose answer is over max_msg: E2BIG, not fatal; one that fits */
		{
			uint8_t *buf = malloc(CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD);
			ckv_ctl_msg m;
			uint32_t handle;
			int fd = raw_connect(sock);

			CHECK(buf);
			raw_hello_v(fd, 2);
			m = (ckv_ctl_msg){ .hdr = { .version = 2, .type = CKV_CTL_OPEN, .id = 2 } };
			memcpy(m.u.open.hash, child.h.b, 16);
			raw_send(fd, &m);
			CHECK(raw_recv(fd, buf, CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD, &m) == CKV_CTL_OPEN_OK);
			handle = m.u.open_ok.handle;
			m = (ckv_ctl_msg){ .hdr = { .version = 2, .type = CKV_CTL_KEYQ, .id = 20 } };
			m.u.keyq.handle = handle;
			m.u.keyq.count = 82;
			raw_send(fd, &m);
			CHECK(raw_recv(fd, buf, CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD, &m) == CKV_CTL_ERROR);
			CHECK(m.u.error.err == E2BIG && !(m.u.error.flags & CKV_CTL_ERR_FATAL));
			m = (ckv_ctl_msg){ .hdr = { .version = 2, .type = CKV_CTL_KEYQ, .id = 21 } };
			m.u.keyq.handle = handle;
			m.u.keyq.count = 10;
			raw_send(fd, &m);
			CHECK(raw_recv(fd, buf, CKV_CTL_HDR + CKV_CTL_MAX_PAYLOAD, &m) == CKV_CTL_KEYQ_OK);
			CHECK(m.u.keyq_ok.count == 10);
			close(fd);
			free(buf);
		}
		printf("keyq: 4 layers x 82 chunks, %u parts in several requests at max_msg 64 KiB, "
		       "equal the store's key copy; 82 chunks in one request E2BIG\n", parts);
	}

	/* ---- limits */
	{
		uint32_t ch[150], pid3, pid4;
		struct coll c1, c2, c3;

		for (uint32_t i = 0; i < 150; i++)
			ch[i] = i % 82;
		/* 100 KV chunks: 3.2 MB of the 4 MiB allowed */
		coll_init(&c1, 100);
		CHECK_RC(s->ops->get(s, child.pid, 0, CKV_SRC_KV, ch, 100, coll_cb, &c1));
		coll_wait(&c1);
		/* 150 more pins: over max_pins 200, refused before sending */
		coll_init(&c2, 150);
		CHECK(s->ops->get(s, child.pid, 0, CKV_SRC_KV, ch, 150, coll_cb, &c2) == -ENOBUFS);
		CHECK(c2.done == 0);
		/* 40 more: fits the pins but not the bytes; the daemon refuses, every chunk says so */
		coll_init(&c3, 40);
		CHECK_RC(s->ops->get(s, child.pid, 0, CKV_SRC_KV, ch, 40, coll_cb, &c3));
		coll_wait(&c3);
		for (int i = 0; i < 40; i++)
			CHECK(c3.rc[i] == -ENOBUFS);
		CHECK(strstr(s->err, "exceed the limit"));
		printf("limits: pins -ENOBUFS locally; bytes -ENOBUFS from the daemon: %s\n", s->err);
		s->ops->release(s, c1.tok, 100);
		coll_free(&c1);
		coll_free(&c2);
		coll_free(&c3);
		wait_unpinned(eng, ctl);
		/* and works again */
		random_gets(s, &child, 5, 64);
		/* prefixes: 2 open, 2 more allowed, the fifth refused */
		CHECK_RC(s->ops->open(s, &child.h, &mf, &pid3));
		ckv_manifest_free(mf);
		free(mf);
		CHECK_RC(s->ops->open(s, &parent.h, &mf, &pid4));
		ckv_manifest_free(mf);
		free(mf);
		CHECK(s->ops->open(s, &parent.h, &mf, &(uint32_t){ 0 }) == -EMFILE);
		s->ops->close(s, pid3);
		s->ops->close(s, pid4);
		CHECK_RC(s->ops->open(s, &parent.h, &mf, &pid3));
		ckv_manifest_free(mf);
		free(mf);
		s->ops->close(s, pid3);
		printf("limits: the fifth prefix -EMFILE, fine again after CLOSE\n");
	}

	/* server-side pin limit with a raw client (a client library would not send this) */
	{
		int fd = raw_connect(sock);
		uint32_t handle, *ch = calloc(201, sizeof(*ch));
		uint8_t buf[8192];
		ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_GET, .id = 7 } };

		CHECK(ch);
		raw_hello(fd);
		handle = raw_open(fd, &child.h);
		m.u.get.handle = handle;
		m.u.get.n = 201;
		m.u.get.chunks = ch;
		raw_send(fd, &m);
		CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_ERROR);
		CHECK(m.hdr.id == 7 && m.u.error.err == ENOBUFS && !(m.u.error.flags & CKV_CTL_ERR_FATAL));
		m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_STATS, .id = 8 } };
		raw_send(fd, &m);
		CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_STATS_OK);
		CHECK(m.hdr.id == 8 && m.u.stats_ok.nfields == CKV_CTL_ST_COUNT);
		CHECK(ckv_ctl_u64(m.u.stats_ok.fields, CKV_CTL_ST_MY_PREFIXES) == 1);
		CHECK(ckv_ctl_u64(m.u.stats_ok.fields, CKV_CTL_ST_MY_PINS) == 0);
		CHECK(ckv_ctl_u64(m.u.stats_ok.fields, CKV_CTL_ST_ARENA_BYTES) == s->arena_size);
		close(fd);
		free(ch);
		printf("limits: a raw GET of 201 chunks gets a non-fatal ENOBUFS; STATS on the same connection\n");
	}

	/* ---- a client SIGKILLed while it holds pins */
	{
		char buf[256] = { 0 };
		char rdy;
		int status;

		snprintf(buf, sizeof(buf), "%s", sock);
		CHECK(write(vic.go_w, buf, sizeof(buf)) == (ssize_t)sizeof(buf));
		CHECK(write(vic.go_w, child.h.b, 16) == 16);
		CHECK(read(vic.ready_r, &rdy, 1) == 1 && rdy == 'R');
		ckv_engine_get_stats(eng, &es0);
		ckv_ctl_stats(ctl, &cs);
		CHECK(es0.pinned >= 20 && cs.pins >= 20);
		CHECK(kill(vic.pid, SIGKILL) == 0);
		CHECK(waitpid(vic.pid, &status, 0) == vic.pid && WIFSIGNALED(status));
		wait_unpinned(eng, ctl);
		printf("sigkill: the victim held %llu pins; all released after its death\n",
		       (unsigned long long)cs.pins);
		close(vic.go_w);
		close(vic.ready_r);
	}

	/* ---- a client that goes away with GETs in flight */
	{
		ckv_source *s2;
		uint32_t pid2, ch[82];
		struct coll c;

		for (uint32_t i = 0; i < 82; i++)
			ch[i] = i;
		CHECK_RC(ckv_source_remote(sock, &s2, &e));
		CHECK_RC(s2->ops->open(s2, &child.h, &mf, &pid2));
		ckv_manifest_free(mf);
		free(mf);
		coll_init(&c, 82);
		CHECK_RC(s2->ops->get(s2, pid2, 1, CKV_SRC_K, ch, 82, coll_cb, &c));
		s2->ops->destroy(s2); /* every callback has run when this returns */
		CHECK(c.done == 82 && !c.dup);
		for (int i = 0; i < 82; i++)
			CHECK(c.rc[i] == 0 || c.rc[i] == -ECONNRESET);
		coll_free(&c);
		wait_unpinned(eng, ctl);
		printf("disconnect with a GET in flight: callbacks done by destroy, pins released\n");
	}

	/* ---- hostile clients; the good client keeps working between them */
	{
		ckv_ctl_stats(ctl, &cs);
		hostile0 = cs.hostile;
		uint8_t hdr[CKV_CTL_HDR];
		int fd;

#define HDR(ver, type, len, id)                                 \
	do {                                                    \
		uint32_t m_ = htole32(CKV_CTL_MAGIC), l_ = htole32(len), i_ = htole32(id); \
		uint16_t v_ = htole16(ver), t_ = htole16(type); \
		memcpy(hdr, &m_, 4);                            \
		memcpy(hdr + 4, &v_, 2);                        \
		memcpy(hdr + 6, &t_, 2);                        \
		memcpy(hdr + 8, &l_, 4);                        \
		memcpy(hdr + 12, &i_, 4);                       \
	} while (0)

		/* random bytes */
		{
			uint8_t junk[64];

			for (int i = 0; i < 64; i++)
				junk[i] = (uint8_t)rnd();
			junk[0] = 'x';
			fd = raw_connect(sock);
			raw_bytes(fd, junk, sizeof(junk));
			expect_fatal(fd, EPROTO, "random bytes");
			nhostile++;
		}
		random_gets(s, &child, 2, 16);

		/* a truncated header, then the stream ends: just a disconnect */
		{
			uint8_t b[1];

			HDR(1, CKV_CTL_HELLO, 10, 1);
			fd = raw_connect(sock);
			raw_bytes(fd, hdr, 8);
			shutdown(fd, SHUT_WR);
			CHECK(recv(fd, b, 1, 0) == 0);
			close(fd);
			printf("  truncated header, then EOF       -> disconnected\n");
		}
		/* a message cut short, then EOF */
		{
			uint8_t b[1];

			HDR(1, CKV_CTL_HELLO, 10, 1);
			fd = raw_connect(sock);
			raw_bytes(fd, hdr, sizeof(hdr));
			raw_bytes(fd, "\1\0\0\0", 4);
			shutdown(fd, SHUT_WR);
			CHECK(recv(fd, b, 1, 0) == 0);
			close(fd);
		}
		/* huge length: over the protocol's maximum, refused on the header */
		HDR(1, CKV_CTL_HELLO, 0x7fffffffu, 3);
		fd = raw_connect(sock);
		raw_bytes(fd, hdr, sizeof(hdr));
		expect_fatal(fd, EMSGSIZE, "length 2 GiB");
		nhostile++;
		/* over this server's max_msg (64 KiB), under 16 MiB */
		HDR(1, CKV_CTL_HELLO, 1u << 20, 4);
		fd = raw_connect(sock);
		raw_bytes(fd, hdr, sizeof(hdr));
		expect_fatal(fd, EMSGSIZE, "length 1 MiB > max_msg");
		nhostile++;
		/* bad version */
		HDR(9, CKV_CTL_HELLO, 0, 5);
		fd = raw_connect(sock);
		raw_bytes(fd, hdr, sizeof(hdr));
		expect_fatal(fd, EPROTONOSUPPORT, "header version 9");
		nhostile++;
		/* unknown type */
		HDR(1, 0x0077, 0, 6);
		fd = raw_connect(sock);
		raw_bytes(fd, hdr, sizeof(hdr));
		expect_fatal(fd, EBADMSG, "unknown type 0x0077");
		nhostile++;
		random_gets(s, &child, 2, 16);
		/* a server-to-client type */
		{
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_STATS_OK, .id = 9 } };

			fd = raw_connect(sock);
			raw_hello(fd);
			raw_send(fd, &m);
			expect_fatal(fd, EBADMSG, "STATS_OK from a client");
			nhostile++;
		}
		/* a request before HELLO */
		{
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_STATS, .id = 10 } };

			fd = raw_connect(sock);
			raw_send(fd, &m);
			expect_fatal(fd, EPROTO, "STATS before HELLO");
			nhostile++;
		}
		/* no common version, and a second HELLO */
		{
			uint16_t v[] = { 7 };
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_HELLO, .id = 11 } };

			m.u.hello.nversions = 1;
			m.u.hello.versions = v;
			fd = raw_connect(sock);
			raw_send(fd, &m);
			expect_fatal(fd, EPROTONOSUPPORT, "HELLO versions {7}");
			nhostile++;
			fd = raw_connect(sock);
			raw_hello(fd);
			v[0] = 1;
			raw_send(fd, &m);
			expect_fatal(fd, EPROTO, "second HELLO");
			nhostile++;
		}
		/* a wrong header version after HELLO */
		{
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_STATS, .id = 12 } };
			uint8_t b[64];
			ckv_ctl_buf cb = { 0 };

			fd = raw_connect(sock);
			raw_hello(fd);
			CHECK_RC(ckv_ctl_encode(&cb, &(ckv_ctl_msg){ .hdr = { .version = 1, .type = CKV_CTL_STATS } }));
			memcpy(b, cb.p, cb.len);
			b[4] = 3; /* version 3: unknown to the parser */
			raw_bytes(fd, b, cb.len);
			ckv_ctl_buf_free(&cb);
			(void)m;
			expect_fatal(fd, EPROTONOSUPPORT, "header version 3 after HELLO");
			nhostile++;
		}
		/* bad handle, layer and chunk out of range */
		{
			uint32_t ch[2] = { 0, 82 };
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_GET, .id = 13 } };

			fd = raw_connect(sock);
			raw_hello(fd);
			m.u.get.handle = 0xdead;
			m.u.get.n = 1;
			m.u.get.chunks = ch;
			raw_send(fd, &m);
			expect_fatal(fd, EBADF, "GET handle 0xdead");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			m.u.get.handle = raw_open(fd, &child.h);
			m.u.get.n = 2;
			raw_send(fd, &m);
			expect_fatal(fd, ERANGE, "GET chunk 82 of 82");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			m.hdr.type = CKV_CTL_PREFETCH;
			m.u.get.handle = raw_open(fd, &child.h);
			m.u.get.layer = 4;
			m.u.get.n = 1;
			raw_send(fd, &m);
			expect_fatal(fd, ERANGE, "PREFETCH layer 4 of 4");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_DIGESTS, .id = 14 } };
			m.u.digests.handle = raw_open(fd, &child.h);
			m.u.digests.first = 80;
			m.u.digests.count = 3;
			raw_send(fd, &m);
			expect_fatal(fd, ERANGE, "DIGESTS chunks 80..83");
			nhostile++;

			/* KEYQ on a connection that negotiated version 1 */
			fd = raw_connect(sock);
			raw_hello(fd);
			m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_KEYQ, .id = 16 } };
			m.u.keyq.handle = raw_open(fd, &child.h);
			m.u.keyq.count = 1;
			raw_send(fd, &m);
			expect_fatal(fd, EPROTO, "KEYQ on protocol version 1");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_CLOSE, .id = 15 } };
			m.u.close.handle = raw_open(fd, &child.h) + 1;
			raw_send(fd, &m);
			expect_fatal(fd, EBADF, "CLOSE of a handle not open");
			nhostile++;
		}
		random_gets(s, &child, 2, 16);
		/* counts whose byte size overflows 32 bits, payload short */
		{
			uint8_t b[CKV_CTL_HDR + 8] = { 0 };
			uint32_t n = htole32(0x40000001u); /* 16 + 4n wraps to 20 in 32 bits */

			fd = raw_connect(sock);
			raw_hello(fd);
			HDR(1, CKV_CTL_GET, 20, 16);
			memcpy(b, hdr, sizeof(hdr));
			raw_bytes(fd, b, CKV_CTL_HDR);
			memset(b, 0, sizeof(b));
			memcpy(b + 12, &n, 4);
			raw_bytes(fd, b, 20);
			expect_fatal(fd, EBADMSG, "GET n=0x40000001 in 20 bytes");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			n = htole32(0x20000001u); /* 8 + 8n wraps to 16 */
			HDR(1, CKV_CTL_RELEASE, 16, 17);
			raw_bytes(fd, hdr, CKV_CTL_HDR);
			memset(b, 0, sizeof(b));
			memcpy(b, &n, 4);
			raw_bytes(fd, b, 16);
			expect_fatal(fd, EBADMSG, "RELEASE n=0x20000001 in 16 bytes");
			nhostile++;
		}
		/* a forged token, a NaN score, a reserved field */
		{
			uint64_t tok = 0x0000000100000005ull;
			uint32_t ch[1] = { 0 };
			float sc[1] = { NAN };
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_RELEASE, .id = 18 } };

			fd = raw_connect(sock);
			raw_hello(fd);
			m.u.release.n = 1;
			m.u.release.tokens = &tok;
			raw_send(fd, &m);
			expect_fatal(fd, ENOENT, "RELEASE of a forged token");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_SCORE, .id = 19 } };
			m.u.score.handle = raw_open(fd, &child.h);
			m.u.score.parts = 1;
			m.u.score.n = 1;
			m.u.score.chunks = ch;
			m.u.score.scores = sc;
			raw_send(fd, &m);
			expect_fatal(fd, EINVAL, "SCORE NaN");
			nhostile++;

			fd = raw_connect(sock);
			raw_hello(fd);
			m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_GET, .id = 20 } };
			m.u.get.handle = raw_open(fd, &child.h);
			m.u.get.n = 1;
			m.u.get.flags = 4;
			m.u.get.chunks = ch;
			raw_send(fd, &m);
			expect_fatal(fd, EINVAL, "GET flags 4");
			nhostile++;
		}
		/* a hostile client with pins: killed for a bad message, pins released */
		{
			uint32_t ch[10] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 };
			ckv_ctl_msg m = { .hdr = { .type = CKV_CTL_GET, .id = 21 } };
			uint8_t buf[4096];
			uint32_t got = 0;

			fd = raw_connect(sock);
			raw_hello(fd);
			m.u.get.handle = raw_open(fd, &child.h);
			m.u.get.n = 10;
			m.u.get.chunks = ch;
			raw_send(fd, &m);
			while (got < 10) {
				CHECK(raw_recv(fd, buf, sizeof(buf), &m) == CKV_CTL_COMPLETE);
				for (uint32_t i = 0; i < m.u.complete.count; i++) {
					ckv_ctl_entry en;

					ckv_ctl_entry_load(m.u.complete.entries, i, &en);
					CHECK(en.rc == 0 && en.token);
				}
				got += m.u.complete.count;
			}
			ckv_ctl_stats(ctl, &cs);
			CHECK(cs.pins >= 10);
			raw_bytes(fd, "garbage garbage garbage", 23);
			expect_fatal(fd, EPROTO, "garbage while holding 10 pins");
			nhostile++;
			wait_unpinned(eng, ctl);
		}
		random_gets(s, &child, 5, 32);
		ckv_ctl_stats(ctl, &cs);
		CHECK(cs.hostile == hostile0 + (uint64_t)nhostile);
		printf("hostile: %d clients sent a fatal ERROR and disconnected; the good client kept working\n",
		       nhostile);
#undef HDR
	}

	/* ---- socket paths */
	{
		char def[256], found[256];
		ckv_source *s3;
		ckv_ctl *ctl2;
		int fd;

		/* a mountpoint whose .ckv/ctl points at the socket */
		snprintf(path, sizeof(path), "%s/.ckv", mnt);
		CHECK(mkdir(mnt, 0755) == 0 && mkdir(path, 0755) == 0);
		snprintf(path, sizeof(path), "%s/.ckv/ctl", mnt);
		CHECK(symlink(sock, path) == 0);
		CHECK_RC(ckv_ctl_find_path(mnt, found, sizeof(found)));
		CHECK(!strcmp(found, sock));
		CHECK_RC(ckv_source_remote(mnt, &s3, &e));
		CHECK_RC(s3->ops->match(s3, &geom, tokens, 100, &h2, &matched));
		CHECK(matched == 96); /* six whole chunks; the store has no 100-token prefix */
		s3->ops->destroy(s3);
		unlink(path);

		/* the default path, and a second server there found without the symlink */
		CHECK_RC(ckv_ctl_default_path(mnt, def, sizeof(def)));
		CHECK(strlen(def) > 5 && !strcmp(def + strlen(def) - 5, ".sock"));
		CHECK(!strncmp(def, "/run/ckvfs/", 11) || !strncmp(def, "/tmp/ckvfs-", 11));
		CHECK_RC(ckv_ctl_start(st, eng, def, NULL, &ctl2));
		CHECK_RC(ckv_ctl_find_path(mnt, found, sizeof(found)));
		CHECK(!strcmp(found, def));
		CHECK_RC(ckv_source_remote(mnt, &s3, &e));
		CHECK_RC(s3->ops->match(s3, &geom, tokens, 100, &h2, &matched));
		s3->ops->destroy(s3);
		ckv_ctl_stop(ctl2);
		CHECK(access(def, F_OK) != 0); /* unlinked at stop */
		CHECK(ckv_source_remote(mnt, &s3, &e) == -ENOENT);
		printf("paths: .ckv/ctl symlink; default %s; unlinked at stop\n", def);
		check_tmp_trust();

		/* a stale socket file is replaced; a regular file is refused */
		snprintf(path, sizeof(path), "%s/stale.sock", dir);
		{
			struct sockaddr_un sa = { .sun_family = AF_UNIX };

			fd = socket(AF_UNIX, SOCK_STREAM, 0);
			snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/stale.sock", dir);
			CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
			close(fd); /* bound, never listened: nobody answers */
		}
		CHECK_RC(ckv_ctl_start(st, eng, path, NULL, &ctl2));
		ckv_ctl_stop(ctl2);
		fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
		CHECK(fd >= 0);
		close(fd);
		CHECK(ckv_ctl_start(st, eng, path, NULL, &ctl2) == -EEXIST);
		unlink(path);
		printf("paths: a stale socket replaced, a regular file refused (-EEXIST), a live one -EADDRINUSE\n");
	}

	/*
	 * ---- HELLO is due within hello_ms: sockets held open without a word
	 * (here max_clients of them) are closed with ETIMEDOUT, and a client
	 * that said HELLO may stay idle past the deadline
	 */
	{
		ckv_ctl_limits l3 = { .max_clients = 3, .hello_ms = 300 };
		uint8_t buf[4096];
		ckv_ctl_msg m;
		ckv_ctl *ctl3;
		ckv_source *s3;
		int quiet[3], talked;

		snprintf(path, sizeof(path), "%s/hello.sock", dir);
		CHECK_RC(ckv_ctl_start(st, eng, path, &l3, &ctl3));
		talked = raw_connect(path);
		raw_hello(talked);
		for (int i = 0; i < 2; i++)
			quiet[i] = raw_connect(path);
		sleep_ms(50);
		quiet[2] = raw_connect(path); /* the fourth connection: refused */
		CHECK(raw_recv(quiet[2], buf, sizeof(buf), &m) == CKV_CTL_ERROR && m.u.error.err == EBUSY);
		close(quiet[2]);
		for (int i = 0; i < 2; i++) {
			CHECK(raw_recv(quiet[i], buf, sizeof(buf), &m) == CKV_CTL_ERROR);
			CHECK(m.u.error.err == ETIMEDOUT && (m.u.error.flags & CKV_CTL_ERR_FATAL));
			CHECK(raw_recv(quiet[i], buf, sizeof(buf), &m) == -1); /* EOF */
			close(quiet[i]);
		}
		m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_STATS, .id = 7 } };
		raw_send(talked, &m); /* idle since its HELLO, well past the deadline */
		CHECK(raw_recv(talked, buf, sizeof(buf), &m) == CKV_CTL_STATS_OK);
		CHECK_RC(ckv_source_remote(path, &s3, &e)); /* the freed places take new clients */
		s3->ops->destroy(s3);
		close(talked);
		ckv_ctl_stop(ctl3);
		printf("hello: two silent connections closed (ETIMEDOUT) after 300 ms, a fourth "
		       "refused meanwhile (EBUSY); the client that said HELLO kept its place\n");
	}

	/*
	 * ---- GETs racing a disconnect, on a small engine of its own (reads really
	 * in flight, some chunks -ENOMEM), then a stop with a client holding pins
	 */
	{
		ckv_engine_opts eo = { .arena_bytes = 4ull << 20, .queue_depth = 8, .no_direct = true };
		ckv_ctl_limits l2 = { .max_pinned_bytes = 1ull << 30 };
		ckv_engine *e2;
		ckv_ctl *ctl2;
		ckv_source *s2;
		uint32_t pid2, ch[82], nomem = 0, ok = 0, reset = 0;
		struct coll c[4];

		snprintf(path, sizeof(path), "%s/small.sock", dir);
		for (uint32_t i = 0; i < 82; i++)
			ch[i] = i;
		CHECK_RC(ckv_engine_open(&eo, &e2));
		CHECK_RC(ckv_ctl_start(st, e2, path, &l2, &ctl2));
		for (int round = 0; round < 20; round++) {
			CHECK_RC(ckv_source_remote(path, &s2, &e));
			CHECK_RC(s2->ops->open(s2, &child.h, &mf, &pid2));
			ckv_manifest_free(mf);
			free(mf);
			for (uint32_t l = 0; l < 4; l++) {
				coll_init(&c[l], 82);
				CHECK_RC(s2->ops->get(s2, pid2, l, round % 2 ? CKV_SRC_KV : CKV_SRC_V, ch, 82,
						      coll_cb, &c[l]));
			}
			if (round % 4 == 3)
				sleep_ms(30); /* let some complete before the hang-up */
			s2->ops->destroy(s2);
			for (uint32_t l = 0; l < 4; l++) {
				CHECK(c[l].done == 82 && !c[l].dup);
				for (int i = 0; i < 82; i++) {
					CHECK(c[l].rc[i] == 0 || c[l].rc[i] == -ENOMEM || c[l].rc[i] == -ECONNRESET);
					ok += c[l].rc[i] == 0;
					nomem += c[l].rc[i] == -ENOMEM;
					reset += c[l].rc[i] == -ECONNRESET;
				}
				coll_free(&c[l]);
			}
		}
		wait_unpinned(e2, ctl2);
		printf("disconnect race: 20 clients x 328 chunks: %u pinned, %u -ENOMEM, %u -ECONNRESET; "
		       "nothing left pinned\n", ok, nomem, reset);

		/* stop while a client holds pins */
		CHECK_RC(ckv_source_remote(path, &s2, &e));
		CHECK_RC(s2->ops->open(s2, &child.h, &mf, &pid2));
		ckv_manifest_free(mf);
		free(mf);
		coll_init(&c[0], 40);
		CHECK_RC(s2->ops->get(s2, pid2, 0, CKV_SRC_K, ch, 40, coll_cb, &c[0]));
		coll_wait(&c[0]);
		ckv_engine_get_stats(e2, &es0);
		CHECK(es0.pinned > 0);
		ckv_ctl_stop(ctl2);
		ckv_engine_get_stats(e2, &es1);
		CHECK(es1.pinned == 0);
		ckv_engine_close(e2);
		CHECK(s2->ops->match(s2, &geom, tokens, 16, &h2, &matched) == -ECONNRESET);
		s2->ops->release(s2, c[0].tok, 40); /* harmless after the end */
		s2->ops->destroy(s2);
		coll_free(&c[0]);
		printf("stop: a connected client's %llu pins released; it sees -ECONNRESET\n",
		       (unsigned long long)es0.pinned);
	}

	/* ---- stop */
	s->ops->close(s, parent.pid);
	s->ops->close(s, child.pid);
	s->ops->destroy(s);
	ckv_ctl_stats(ctl, &cs);
	printf("server: %llu accepted, %llu requests, %llu errors, %llu hostile, %llu disconnects\n",
	       (unsigned long long)cs.accepted, (unsigned long long)cs.messages,
	       (unsigned long long)cs.errors, (unsigned long long)cs.hostile,
	       (unsigned long long)cs.disconnects);
	ckv_ctl_stop(ctl);
	CHECK(access(sock, F_OK) != 0);
	ckv_engine_get_stats(eng, &es1);
	CHECK(es1.pinned == 0);
	ckv_engine_close(eng);
	ckv_store_close(st);
	free(tokens);
	rm_rf(dir);
	printf("ok\n");
	return 0;
}
