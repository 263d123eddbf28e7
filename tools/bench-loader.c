/*
 * bench-loader — chunk fetch throughput of libckvgpu against raw reads of
 * the same chunks (DESIGN §8: always ratios measured side by side).
 *
 * One store (WORKDIR/store, generated with `ckv gen` on first use: a model
 * preset, N tokens, optionally planted chunks), one selected chunk set per
 * layer (budget B of the chunks, random or — with --plant — the digest
 * top-k for the planted query, which finds the planted chunks), and, median
 * of R runs each:
 *
 *   raw io_uring     the selected chunks read straight from the segment layer
 *                    files: O_DIRECT, adjacent chunks merged into one read,
 *                    at the engine's queue depth (128; --qd), into one host
 *                    buffer;
 *   loader cold      a fresh loader (new embedded engine, empty arena) after
 *                    the page cache of the store is dropped: every layer's
 *                    ckv_fetch_start issued, then every ckv_fetch_wait, into
 *                    backend memory (device memory with CUDA);
 *   loader cold/layer the same, one layer at a time (start, wait, next);
 *   loader warm      the same fetches again on that loader: arena hits;
 *                    the first pass after the cold one, and the steady
 *                    state (--pairs more passes), each timed until the
 *                    stream has run every copy (the bytes are in place, as
 *                    when cudaMemcpy returns), and until ckv_loader_sync
 *                    returns (every pin released too);
 *   contiguous copy  the same number of bytes as one copy: memcpy between
 *                    host buffers (host backend) or one cudaMemcpy from the
 *                    registered (pinned) arena to device memory (CUDA),
 *                    beside each steady warm pass (after it, and before it
 *                    every other pair, so that neither side always follows
 *                    the other): the steady ratio is the median over those
 *                    pairs of copy time / pass time, so that a stretch of
 *                    slower link hits both sides;
 *   behind GPU work  (CUDA) the same pairs again, each side enqueued on the
 *                    stream after 1 ms of GPU work, as a serving engine
 *                    issues a layer's fetch while the model computes, and
 *                    timed by CUDA events around it: the transfers' device
 *                    time, without the host time an idle stream waits for
 *                    (the first fetch's pin pass and launch; the copy's
 *                    submission). The reference gather figures (bench-gather,
 *                    MEASUREMENTS.md) are device times measured this way.
 *
 * Cold runs are compared with raw io_uring, warm ones with the contiguous
 * copy. Read amplification of the cold loader (bytes its engine read from
 * disk over the bytes selected) is printed too; it must be 1.00.
 *
 * Warm hit path, per layer: the source's get and release of the layer's
 * chunk set, all arena hits (what a warm fetch costs its thread besides
 * enqueuing the copy), against the warm baseline's copy of the layer's
 * bytes: with CUDA the fetch is host-bound where the first exceeds the
 * second.
 *
 * Identification cost, per layer (median of R, random queries and keys of
 * --score-tokens new tokens, --q-per-kv query heads per kv head): scores
 * from the key digests (ckv_digest_scores) and by attention mass over the
 * 3-bit key copy (ckv_keyq_scores; with CUDA also ckv_keyq_scores_device,
 * query and keys in device memory), beside the time the cold loader took
 * per layer: what an identification costs next to the I/O it decides.
 *
 * Exit status: 0 ok, 1 failure, 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <liburing.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef CKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "ckv_cuda.h"
#endif

#include "ckv_store.h"
#include "ckvgpu.h"
#include "loader_int.h"

#define EXIT_USAGE 2
#define MAX_RUNS 15
#define PAIRS_DEFAULT 25 /* steady-state warm passes (each paired with a copy) per run */
#define MAX_PAIRS 200
#define RAW_QD_DEFAULT 128u /* the engine's default queue depth: same depth, same disk */
#define RAW_MAX_MERGE (1u << 20) /* bytes per raw read, as the engine's merges */

struct opts {
	const char *model;
	uint32_t tokens;
	double budget, plant;
	ckv_backend_kind backend;
	int runs;
	uint32_t layers;
	uint32_t qd;        /* raw reader queue depth */
	uint64_t seed;
	uint32_t score_tokens; /* new tokens whose queries identification scores */
	uint32_t q_per_kv;     /* query heads per kv head */
	uint32_t gather_threads; /* CUDA gather kernel's block size; 0: the backend's default */
	uint32_t pairs;          /* steady warm passes a run, each beside a copy */
};

struct bench {
	struct opts o;
	char store[PATH_MAX], hash[33], ckv[PATH_MAX], plant_json[PATH_MAX];
	ckv_manifest *m;     /* the prefix's store record */
	ckv_geom g;
	uint32_t L, mchunks;
	uint32_t **sel;      /* [L] selected chunk ids, ascending */
	uint32_t *nsel;      /* [L] */
	uint64_t total;      /* selected bytes over all measured layers */
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
	va_list ap;

	fputs("bench-loader: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 1;
}

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- the data ------------------------------------------------------------- */

/* Run `ckv gen` unless WORKDIR/store already holds a prefix for these options. */
static int prepare_store(struct bench *b, const char *workdir)
{
	char cmd[5 * PATH_MAX + 512], tag[PATH_MAX], line[128] = "";
	FILE *f;
	int n;

	if (snprintf(b->store, sizeof(b->store), "%s/store", workdir) >= (int)sizeof(b->store) ||
	    snprintf(tag, sizeof(tag), "%s/%s-%u-%g.hash", workdir, b->o.model, b->o.tokens,
		     b->o.plant) >= (int)sizeof(tag) ||
	    snprintf(b->plant_json, sizeof(b->plant_json), "%s/%s-%u-%g.plant.json", workdir,
		     b->o.model, b->o.tokens, b->o.plant) >= (int)sizeof(b->plant_json))
		return fail("%s: path too long", workdir);
	f = fopen(tag, "r");
	if (f) {
		bool ok = fgets(line, sizeof(line), f) != NULL;

		fclose(f);
		line[strcspn(line, "\n")] = 0;
		if (ok && strlen(line) == 32) {
			memcpy(b->hash, line, sizeof(b->hash)); /* 32 digits and the NUL */
			return 0;
		}
	}
	if (mkdir(workdir, 0755) < 0 && errno != EEXIST)
		return fail("%s: %s", workdir, strerror(errno));
	fprintf(stderr, "generating %s, %u tokens%s in %s ...\n", b->o.model, b->o.tokens,
		b->o.plant > 0 ? " with planted chunks" : "", b->store);
	n = snprintf(cmd, sizeof(cmd),
		     "'%s' init '%s' >/dev/null && '%s' gen -q --no-sync '%s' --model '%s' --tokens %u --seed 11",
		     b->ckv, b->store, b->ckv, b->store, b->o.model, b->o.tokens);
	if (n > 0 && n < (int)sizeof(cmd) && b->o.plant > 0)
		n += snprintf(cmd + n, sizeof(cmd) - (size_t)n, " --plant %g --plant-out '%s'", b->o.plant,
			      b->plant_json);
	if (n < 0 || n >= (int)sizeof(cmd))
		return fail("%s: path too long", workdir);
	f = popen(cmd, "r");
	if (!f)
		return fail("cannot run %s", b->ckv);
	if (!fgets(line, sizeof(line), f))
		line[0] = 0;
	line[strcspn(line, "\n")] = 0;
	if (pclose(f) != 0 || strlen(line) != 32)
		return fail("'%s' failed", cmd);
	memcpy(b->hash, line, sizeof(b->hash));
	f = fopen(tag, "w");
	if (f) {
		fprintf(f, "%s\n", b->hash);
		fclose(f);
	}
	return 0;
}

/* Per layer: a random set of ceil(budget * m), or the digest top-k for the planted query. */
static int choose_sets(struct bench *b, ckv_loader *l, ckv_prefix *p)
{
	json_t *root = NULL, *query = NULL;
	float *sc = NULL, *q = NULL;
	uint64_t seed = b->o.seed;
	int rc = 0;

	b->sel = calloc(b->L, sizeof(*b->sel));
	b->nsel = calloc(b->L, sizeof(*b->nsel));
	sc = malloc(sizeof(*sc) * b->mchunks);
	q = malloc(sizeof(*q) * b->g.kv_heads * b->g.head_dim);
	if (!b->sel || !b->nsel || !sc || !q) {
		rc = fail("out of memory");
		goto out;
	}
	if (b->o.plant > 0) {
		json_error_t je;

		root = json_load_file(b->plant_json, 0, &je);
		query = root ? json_object_get(root, "query") : NULL;
		if (!json_is_array(query) || json_array_size(query) != b->g.layers) {
			rc = fail("%s: no query of %u layers (%s)", b->plant_json, b->g.layers, je.text);
			goto out;
		}
	}
	for (uint32_t layer = 0; layer < b->L; layer++) {
		int n;

		b->sel[layer] = malloc(sizeof(**b->sel) * b->mchunks);
		if (!b->sel[layer]) {
			rc = fail("out of memory");
			goto out;
		}
		if (query) {
			json_t *lq = json_array_get(query, layer);

			for (uint32_t h = 0; h < b->g.kv_heads; h++)
				for (uint32_t d = 0; d < b->g.head_dim; d++)
					q[h * b->g.head_dim + d] =
						(float)json_real_value(json_array_get(json_array_get(lq, h), d));
			if (ckv_digest_scores(p, layer, q, 1, b->g.kv_heads, sc) < 0) {
				rc = fail("digest scores: %s", ckv_loader_error(l));
				goto out;
			}
		} else {
			for (uint32_t j = 0; j < b->mchunks; j++)
				sc[j] = (float)(mix(seed++) >> 40);
		}
		n = ckv_select_topk(sc, b->mchunks, b->o.budget, b->sel[layer]);
		if (n < 0) {
			rc = fail("select: budget %g", b->o.budget);
			goto out;
		}
		b->nsel[layer] = (uint32_t)n;
		b->total += (uint64_t)n * b->g.chunk_bytes;
	}
out:
	json_decref(root);
	free(sc);
	free(q);
	return rc;
}

/* Path of extent x's segment layer file. */
static void seg_layer_path(const struct bench *b, uint32_t x, uint32_t layer, char *path, size_t len)
{
	char seg[256], name[32];

	ckv_segment_path(b->m->extents[x].segment, seg, sizeof(seg));
	ckv_layer_name(layer, name);
	if (snprintf(path, len, "%s/%s/%s", b->store, seg, name) >= (int)len)
		path[0] = 0; /* too long: the open fails and says so */
}

/* The extent holding prefix chunk j, and j's index in that segment. */
static void chunk_loc(const struct bench *b, uint32_t j, uint32_t *x_out, uint32_t *idx)
{
	uint32_t start = 0, x = 0;

	while (j >= start + b->m->extents[x].count)
		start += b->m->extents[x++].count;
	*x_out = x;
	*idx = b->m->extents[x].first + (j - start);
}

/* Drop the page cache of every segment layer file of the prefix. */
static void drop_cache(const struct bench *b)
{
	int fd;

	sync();
	for (uint32_t layer = 0; layer < b->g.layers; layer++)
		for (uint32_t x = 0; x < b->m->nextents; x++) {
			char path[PATH_MAX];

			seg_layer_path(b, x, layer, path, sizeof(path));
			fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd >= 0) {
				posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
				close(fd);
			}
		}
	fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC); /* root only; harmless otherwise */
	if (fd >= 0) {
		if (write(fd, "1", 1) < 0) { /* not allowed: the fadvise above did what it could */
		}
		close(fd);
	}
}

/* ---- raw io_uring O_DIRECT reads ---------------------------------------------- */

struct rawread {
	int fd;
	uint64_t off, len, done;
	uint8_t *dst;
};

static int raw_read(const struct bench *b, uint8_t *buf, double *secs)
{
	struct io_uring ring;
	struct rawread *rd;
	uint32_t nrd = 0, cap = 0, next = 0, inflight = 0, ndone = 0;
	int *fds;
	uint8_t *dst = buf;
	double t0;
	int rc;

	fds = malloc(sizeof(*fds) * (size_t)b->L * b->m->nextents);
	if (!fds)
		return -ENOMEM;
	for (size_t i = 0; i < (size_t)b->L * b->m->nextents; i++)
		fds[i] = -1;
	for (uint32_t layer = 0; layer < b->L; layer++)
		for (uint32_t k = 0; k < b->nsel[layer]; k++)
			cap++;
	rd = calloc(cap ? cap : 1, sizeof(*rd));
	if (!rd) {
		free(fds);
		return -ENOMEM;
	}
	/* plan: merged runs of adjacent chunks of one file (opening files is not timed) */
	for (uint32_t layer = 0; layer < b->L; layer++)
		for (uint32_t k = 0; k < b->nsel[layer]; k++) {
			char path[PATH_MAX];
			uint32_t x, idx;
			uint64_t off;
			int *fd;

			chunk_loc(b, b->sel[layer][k], &x, &idx);
			seg_layer_path(b, x, layer, path, sizeof(path));
			fd = &fds[(size_t)layer * b->m->nextents + x];
			if (*fd < 0 && (*fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC)) < 0) {
				rc = -errno;
				fail("%s: %s", path, strerror(errno));
				goto out;
			}
			off = (uint64_t)idx * b->g.chunk_bytes;
			if (nrd && rd[nrd - 1].fd == *fd && rd[nrd - 1].off + rd[nrd - 1].len == off &&
			    rd[nrd - 1].len + b->g.chunk_bytes <= RAW_MAX_MERGE) {
				rd[nrd - 1].len += b->g.chunk_bytes;
			} else {
				rd[nrd++] = (struct rawread){ .fd = *fd, .off = off, .len = b->g.chunk_bytes, .dst = dst };
			}
			dst += b->g.chunk_bytes;
		}
	rc = io_uring_queue_init(b->o.qd, &ring, 0);
	if (rc < 0) {
		fail("io_uring_queue_init: %s", strerror(-rc));
		goto out;
	}
	t0 = now_s();
	while (ndone < nrd) {
		struct io_uring_cqe *cqe;

		while (inflight < b->o.qd && next < nrd) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
			struct rawread *r = &rd[next++];

			io_uring_prep_read(sqe, r->fd, r->dst + r->done, (unsigned)(r->len - r->done),
					   r->off + r->done);
			io_uring_sqe_set_data(sqe, r);
			inflight++;
		}
		rc = io_uring_submit_and_wait(&ring, 1);
		if (rc < 0 && rc != -EINTR) {
			fail("io_uring_submit: %s", strerror(-rc));
			break;
		}
		while (io_uring_peek_cqe(&ring, &cqe) == 0) {
			struct rawread *r = io_uring_cqe_get_data(cqe);
			int res = cqe->res;

			io_uring_cqe_seen(&ring, cqe);
			inflight--;
			if (res == -EAGAIN || res == -EINTR) {
				res = 0;
			} else if (res <= 0) {
				rc = fail("raw read: %s", res ? strerror(-res) : "unexpected end of file");
				goto out_ring;
			}
			r->done += (uint64_t)res;
			if (r->done < r->len) { /* short read: the rest again */
				struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);

				io_uring_prep_read(sqe, r->fd, r->dst + r->done, (unsigned)(r->len - r->done),
						   r->off + r->done);
				io_uring_sqe_set_data(sqe, r);
				inflight++;
			} else {
				ndone++;
			}
		}
	}
	*secs = now_s() - t0;
	rc = 0;
out_ring:
	io_uring_queue_exit(&ring);
out:
	for (size_t i = 0; i < (size_t)b->L * b->m->nextents; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free(fds);
	free(rd);
	return rc;
}

/* ---- loader fetches ------------------------------------------------------------- */

/* Block until the backend has run everything on the (default) stream; not its callbacks. */
static void stream_wait(ckv_loader *l)
{
#ifdef CKV_HAVE_CUDA
	if (ckv_loader_backend(l) == CKV_BACKEND_CUDA)
		cudaStreamSynchronize(NULL);
#else
	(void)l; /* the host backend copies inside the calls */
#endif
}

/*
 * Every measured layer's selected chunks into dev, one region per layer:
 * every start, then every wait (per_layer: each start's wait right after
 * it). first (optional): seconds from t0 until the first layer's start
 * returned. 0, -ENOMEM or the first failure's -errno.
 */
static int fetch_layers(const struct bench *b, ckv_prefix *p, uint8_t *dev, bool per_layer,
			double t0, double *first)
{
	ckv_fetch **f = calloc(b->L, sizeof(*f));
	uint8_t *dst = dev;
	int rc = 0;

	if (!f)
		return -ENOMEM;
	for (uint32_t layer = 0; layer < b->L && rc == 0; layer++) {
		rc = ckv_fetch_start(p, layer, b->sel[layer], b->nsel[layer], CKV_PART_KV, dst, NULL,
				     NULL, &f[layer]);
		if (first && layer == 0)
			*first = now_s() - t0;
		if (rc == 0 && per_layer) {
			rc = ckv_fetch_wait(f[layer]);
			f[layer] = NULL;
		}
		dst += (uint64_t)b->nsel[layer] * b->g.chunk_bytes;
	}
	for (uint32_t layer = 0; layer < b->L; layer++)
		if (f[layer]) {
			int r = ckv_fetch_wait(f[layer]);

			if (rc == 0)
				rc = r;
		}
	free(f);
	return rc;
}

/*
 * fetch_layers, then ckv_loader_sync. secs: until that returned (bytes in
 * place, every pin released); calls (optional): until the last wait
 * returned; landed (optional): until the stream had run every copy (the
 * bytes in place; pin releases may still be running); first (optional):
 * until the first layer's start returned (its gather enqueued when its
 * chunks were all in the arena).
 */
static int loader_fetch(const struct bench *b, ckv_loader *l, ckv_prefix *p, uint8_t *dev,
			bool per_layer, double *secs, double *calls, double *landed, double *first)
{
	double t0 = now_s();
	int rc = fetch_layers(b, p, dev, per_layer, t0, first);

	if (rc == -ENOMEM)
		return rc;
	if (calls)
		*calls = now_s() - t0;
	if (rc == 0)
		stream_wait(l);
	if (landed)
		*landed = now_s() - t0;
	if (rc == 0)
		rc = ckv_loader_sync(l, NULL);
	*secs = now_s() - t0;
	if (rc < 0)
		fail("fetch: %s", ckv_loader_error(l));
	return rc;
}

/* The warm baseline: the selected bytes as one contiguous copy (see the top). */
static int contiguous_copy(const struct bench *b, ckv_loader *l, uint8_t *dev, const uint8_t *host,
			   uint8_t *host2)
{
	if (ckv_loader_backend(l) == CKV_BACKEND_CUDA) {
		uint64_t asz;
		const void *arena = ckv_loader_arena(l, &asz);

		/* pinned (registered) host memory to the device: one cudaMemcpy */
		if (asz < b->total)
			return fail("contiguous copy: the arena (%llu bytes) is smaller than the copy",
				    (unsigned long long)asz);
#ifdef CKV_HAVE_CUDA
		cudaError_t e = cudaMemcpy(dev, arena, b->total, cudaMemcpyHostToDevice);

		if (e != cudaSuccess)
			return fail("contiguous copy: cudaMemcpy: %s", cudaGetErrorString(e));
#endif
	} else {
		memcpy(host2, host, b->total);
	}
	return 0;
}

#ifdef CKV_HAVE_CUDA
#define BEHIND_S 1e-3 /* GPU work each side of a "behind" pair is enqueued after */

/*
 * One side of a "behind" pair: SPIN of GPU work on the default stream (the
 * backend's compute replay, as a serving engine's previous layer), then
 * either the steady warm pass (pass: every layer's start, then every wait)
 * or the contiguous copy (one cudaMemcpyAsync of the same bytes from the
 * registered arena), between two CUDA events. Their elapsed time is the
 * device time of the transfer itself: the host's calls are made while the
 * spin runs, as they are while a model computes. The second event is
 * recorded after the waits, so a gather a wait enqueued late can only
 * lengthen the pass.
 */
static int behind_one(const struct bench *b, ckv_loader *l, ckv_prefix *p, uint8_t *dev, bool pass,
		      cudaEvent_t ev[2], double *secs)
{
	uint64_t asz;
	const void *arena = ckv_loader_arena(l, &asz);
	float ms;

	if (l->be->ops->compute(l->be, BEHIND_S, NULL) < 0 || cudaEventRecord(ev[0], NULL) != cudaSuccess)
		return fail("behind: the GPU work before the transfer: %s", ckv_loader_error(l));
	if (pass) {
		int rc = fetch_layers(b, p, dev, false, 0, NULL);

		if (rc < 0)
			return fail("behind: fetch: %s", rc == -ENOMEM ? "out of memory" : ckv_loader_error(l));
	} else if (asz < b->total ||
		   cudaMemcpyAsync(dev, arena, b->total, cudaMemcpyHostToDevice, NULL) != cudaSuccess) {
		return fail("behind: the contiguous copy failed");
	}
	if (cudaEventRecord(ev[1], NULL) != cudaSuccess || cudaEventSynchronize(ev[1]) != cudaSuccess ||
	    cudaEventElapsedTime(&ms, ev[0], ev[1]) != cudaSuccess)
		return fail("behind: CUDA events failed");
	if (pass && ckv_loader_sync(l, NULL) < 0)
		return fail("behind: sync: %s", ckv_loader_error(l));
	*secs = ms * 1e-3;
	return 0;
}
#endif

static int open_loader(const struct bench *b, ckv_loader **l, ckv_prefix **p)
{
	static bool told; /* about --gather-threads without CUDA, once */
	ckv_loader_opts o = { .backend = b->o.backend };
	uint64_t arena = 2 * b->total + (64u << 20);

	o.arena_bytes = arena < (1ull << 30) ? (1ull << 30) : arena;
	if (ckv_loader_open(b->store, &o, l) < 0)
		return fail("%s: %s", b->store, ckv_loader_error(NULL));
	if (b->o.gather_threads && ckv_loader_backend(*l) != CKV_BACKEND_CUDA && !told) {
		fprintf(stderr, "bench-loader: --gather-threads %u: only the CUDA backend has a gather "
				"kernel; ignored\n",
			b->o.gather_threads);
		told = true;
	}
#ifdef CKV_HAVE_CUDA
	if (b->o.gather_threads && ckv_loader_backend(*l) == CKV_BACKEND_CUDA) {
		ckv_cuda_gather_cfg cfg;

		ckv_cuda_get_gather_cfg((*l)->be, &cfg);
		cfg.threads = b->o.gather_threads;
		if (ckv_cuda_set_gather_cfg((*l)->be, &cfg) < 0) {
			ckv_loader_close(*l);
			return fail("--gather-threads %u: refused by the CUDA backend",
				    b->o.gather_threads);
		}
	}
#endif
	if (ckv_prefix_open(*l, b->hash, p) < 0) {
		fail("prefix %s: %s", b->hash, ckv_loader_error(*l));
		ckv_loader_close(*l);
		return 1;
	}
	return 0;
}

/*
 * A fresh loader on the store with an empty arena, destination memory
 * touched once (as an engine's KV buffers would be), and the page cache
 * dropped: the start of every cold measurement. On failure *l and *p are
 * set as far as they got, for the caller's cleanup.
 */
static int fresh_loader(const struct bench *b, ckv_loader **l, ckv_prefix **p, uint8_t **dev,
			const uint8_t *host)
{
	if (open_loader(b, l, p))
		return -1;
	if (ckv_loader_alloc(*l, b->total, (void **)dev) < 0) {
		fail("cannot allocate %llu bytes of backend memory: %s", (unsigned long long)b->total,
		     ckv_loader_error(*l));
		return -1;
	}
	if (ckv_loader_from_host(*l, *dev, host, b->total) < 0) {
		fail("%s", ckv_loader_error(*l));
		return -1;
	}
	drop_cache(b);
	return 0;
}

static void usage(FILE *to)
{
	fprintf(to,
		"usage: bench-loader [options] WORKDIR\n\n"
		"Fetch throughput of libckvgpu vs raw io_uring O_DIRECT reads of the same chunks\n"
		"(cold) and vs one contiguous copy of the same bytes (warm). The store is\n"
		"WORKDIR/store, generated with ckv gen on first use.\n\n"
		"  -m, --model M      model preset (default qwen2.5-7b)\n"
		"  -n, --tokens N     prefix tokens (default 16384)\n"
		"  -b, --budget B     fraction of each layer's chunks fetched (default 0.1)\n"
		"  --plant F          plant a fraction F of chunks and fetch the digest top-k of the\n"
		"                     planted query (default: a random set per layer)\n"
		"  --backend K        auto, host or cuda (default auto)\n"
		"  -r, --runs R       runs of each measurement, median reported (default 3)\n"
		"  --pairs N          steady warm passes a run, each beside one contiguous copy;\n"
		"                     their ratio is the median of all runs' pairs (1..200,\n"
		"                     default 25)\n"
		"  --layers L         fetch the first L layers only (default all)\n"
		"  --qd N             raw reader queue depth (default 128, the engine's)\n"
		"  --score-tokens N   new tokens scored in the identification table (default 16)\n"
		"  --q-per-kv N       query heads per kv head there (default 7, Qwen2.5-7B's)\n"
		"  --gather-threads N threads a block of the CUDA gather kernel (64..1024, a multiple\n"
		"                     of 32; default: the backend's)\n"
		"  --ckv PATH         the ckv tool (default: next to this program, or $CKV)\n"
		"  -h, --help         this text;  -V, --version  the version\n");
}

/* An integer option in [lo, hi] (hi UINT32_MAX: any positive one); -1 with a message. */
static int opt_u32(const char *name, const char *arg, uint32_t lo, uint32_t hi, uint32_t *out)
{
	char *end;
	unsigned long v = strtoul(arg, &end, 10);

	if (*end || !*arg || v < lo || v > hi) {
		if (hi == UINT32_MAX)
			fprintf(stderr, "bench-loader: --%s %s: expected a positive integer\n", name, arg);
		else
			fprintf(stderr, "bench-loader: --%s %s: expected %u..%u\n", name, arg, lo, hi);
		return -1;
	}
	*out = (uint32_t)v;
	return 0;
}

/* xorshift64* floats in [-1, 1) */
static float rnd(uint64_t *x)
{
	*x ^= *x >> 12;
	*x ^= *x << 25;
	*x ^= *x >> 27;
	return (float)((*x * 2685821657736338717ull) >> 40) / (float)(1u << 23) - 1.0f;
}

/* The warm fetch's host path without its copy (see the top), next to copy_s per layer. */
static int hitpath_table(const struct bench *b, ckv_loader *l, ckv_prefix *p, double copy_s)
{
	double t[MAX_RUNS], hit;

	for (int r = 0; r < b->o.runs; r++) {
		double t0 = now_s();

		for (uint32_t layer = 0; layer < b->L; layer++) {
			struct rbatch *rb;
			int rc = ckv_rbatch_issue(p, layer, CKV_SRC_KV, b->sel[layer], b->nsel[layer], NULL,
						  &rb);

			if (rc == 0)
				ckv_rbatch_wait(rb);
			ckv_rbatch_free_all(rb);
			if (rc < 0)
				return fail("warm hit path: %s", ckv_loader_error(l));
		}
		t[r] = (now_s() - t0) / b->L;
	}
	hit = median(t, b->o.runs);
	printf("warm hit path per layer (%.0f chunks): source get + release %.1f us, %.2f of the "
	       "layer's copy (%.1f us)\n",
	       (double)(b->total / b->g.chunk_bytes) / b->L, hit * 1e6, hit / copy_s, copy_s * 1e6);
	return 0;
}

/* One row of the identification table: what, its time, as a fraction of a layer's cold fetch. */
static void id_row(const char *what, double s, double layer_s)
{
	char ratio[32];

	snprintf(ratio, sizeof(ratio), "%.3f of a fetch", s / layer_s);
	printf("| %-38s | %9.3f | %-22s |\n", what, s * 1e3, ratio);
}

/* Identification per layer: digest scores vs key-copy scores, beside a cold layer's fetch. */
static int score_table(const struct bench *b, ckv_loader *l, ckv_prefix *p, double layer_s)
{
	uint32_t T = b->o.score_tokens, qh = b->g.kv_heads * b->o.q_per_kv, D = b->g.head_dim;
	float *q = malloc(sizeof(float) * T * qh * D), *k = malloc(sizeof(float) * T * b->g.kv_heads * D);
	float *sc = malloc(sizeof(float) * b->mchunks);
	double td[MAX_RUNS], tk[MAX_RUNS], tkd[MAX_RUNS], tr[MAX_RUNS], dig, kq, kqd = 0, kqr;
	uint64_t kq_bytes = 0;
	uint64_t x = 0x9e3779b97f4a7c15ull;
	size_t nq = (size_t)T * qh * D, nk = (size_t)T * b->g.kv_heads * D;
	bool dev = ckv_loader_backend(l) == CKV_BACKEND_CUDA;
	void *qd = NULL, *kd = NULL, *sd = NULL;
	int rc = 0;

	if (!q || !k || !sc) {
		rc = fail("out of memory");
		goto out;
	}
	for (size_t i = 0; i < nq; i++)
		q[i] = rnd(&x);
	for (size_t i = 0; i < nk; i++)
		k[i] = rnd(&x);
	/* the device scorer's inputs and output in device memory, as an engine has them */
	if (dev && (ckv_loader_alloc(l, nq * sizeof(float), &qd) < 0 ||
		    ckv_loader_alloc(l, nk * sizeof(float), &kd) < 0 ||
		    ckv_loader_alloc(l, (uint64_t)b->mchunks * sizeof(float), &sd) < 0 ||
		    ckv_loader_from_host(l, qd, q, nq * sizeof(float)) < 0 ||
		    ckv_loader_from_host(l, kd, k, nk * sizeof(float)) < 0)) {
		rc = fail("device memory for the scores: %s", ckv_loader_error(l));
		goto out;
	}
	for (int r = 0; r < b->o.runs && rc == 0; r++) {
		uint32_t layer = (uint32_t)r % b->L;
		double t0 = now_s();

		if (ckv_digest_scores(p, layer, q, T, qh, sc) < 0) {
			rc = fail("digest scores: %s", ckv_loader_error(l));
			break;
		}
		td[r] = now_s() - t0;
		t0 = now_s();
		if (ckv_keyq_scores(p, layer, q, k, T, qh, sc) < 0) {
			rc = fail("key-copy scores: %s", ckv_loader_error(l));
			break;
		}
		tk[r] = now_s() - t0;
		t0 = now_s();
		if (dev && ckv_keyq_scores_device(p, layer, qd, kd, T, qh, sd, NULL) < 0) {
			rc = fail("key-copy scores on the device: %s", ckv_loader_error(l));
			break;
		}
		tkd[r] = now_s() - t0;
		{
			/* what both key-copy scorers start with: the layer's copy read from the store */
			struct ckv_keyq c;

			t0 = now_s();
			if (ckv_prefix_keyq(p, layer, &c) < 0) {
				rc = fail("key copy: %s", ckv_loader_error(l));
				break;
			}
			tr[r] = now_s() - t0;
			kq_bytes = ckv_prefix_keyq_bytes(p, &c);
			ckv_keyq_free(&c);
		}
	}
	if (rc)
		goto out;
	dig = median(td, b->o.runs);
	kq = median(tk, b->o.runs);
	if (dev)
		kqd = median(tkd, b->o.runs);
	kqr = median(tr, b->o.runs);
	printf("identification per layer, %u new tokens x %u query heads, %u chunks (median of %d):\n",
	       T, qh, b->mchunks, b->o.runs);
	printf("| %-38s | %9s | %-22s |\n", "what", "time ms", "ratio");
	printf("|%s|%s|%s|\n", "----------------------------------------", "-----------",
	       "------------------------");
	printf("| %-38s | %9.3f | %-22s |\n", "loader cold, one layer's fetch", layer_s * 1e3, "1.00");
	{
		char what[64];

		id_row("digest scores (digest.bin)", dig, layer_s);
		id_row("key-copy mass scores (keyq.bin)", kq, layer_s);
		snprintf(what, sizeof(what), "reading the key copy (%.1f MiB)",
			 (double)kq_bytes / 1048576.0);
		id_row(what, kqr, layer_s);
		if (dev)
			id_row("key-copy mass scores, on the GPU", kqd, layer_s);
	}
out:
	ckv_loader_free(l, qd); /* NULL: nothing */
	ckv_loader_free(l, kd);
	ckv_loader_free(l, sd);
	free(q);
	free(k);
	free(sc);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "model", required_argument, NULL, 'm' }, { "tokens", required_argument, NULL, 'n' },
		{ "budget", required_argument, NULL, 'b' }, { "plant", required_argument, NULL, 'P' },
		{ "backend", required_argument, NULL, 'B' }, { "runs", required_argument, NULL, 'r' },
		{ "layers", required_argument, NULL, 'L' }, { "ckv", required_argument, NULL, 'C' },
		{ "qd", required_argument, NULL, 'Q' },
		{ "score-tokens", required_argument, NULL, 'S' }, { "q-per-kv", required_argument, NULL, 'G' },
		{ "gather-threads", required_argument, NULL, 'T' }, { "pairs", required_argument, NULL, 'W' },
		{ "help", no_argument, NULL, 'h' }, { "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	struct bench b = { .o = { .model = "qwen2.5-7b", .tokens = 16384, .budget = 0.1,
				  .backend = CKV_BACKEND_AUTO, .runs = 3, .seed = 1,
				  .qd = RAW_QD_DEFAULT, .score_tokens = 16, .q_per_kv = 7,
				  .pairs = PAIRS_DEFAULT } };
	double t_raw[MAX_RUNS], t_cold[MAX_RUNS], t_layer[MAX_RUNS], t_warm[MAX_RUNS], t_copy[MAX_RUNS];
	double t_wcalls[MAX_RUNS], t_warm1[MAX_RUNS], t_warm1s[MAX_RUNS], t_wsync[MAX_RUNS];
	double t_wfirst[MAX_RUNS], run_ratio[MAX_RUNS];
	static double pair_ratio[MAX_RUNS * MAX_PAIRS], pair_sync[MAX_RUNS * MAX_PAIRS];
	static double bh_ratio[MAX_RUNS * MAX_PAIRS], bh_pass[MAX_RUNS * MAX_PAIRS], bh_copy[MAX_RUNS * MAX_PAIRS];
	int nbh = 0; /* behind pairs measured (CUDA only) */
	double tcopy[MAX_PAIRS];
	double amp = 0, raw, cold, layer, warm, copy;
	const char *ckv = NULL;
	ckv_loader *l = NULL;
	ckv_prefix *p = NULL;
	ckv_store *s;
	ckv_err e;
	ckv_hash h;
	uint8_t *host = NULL, *host2 = NULL, *dev = NULL;
	char *end;
	int c, rc = 1;

	while ((c = getopt_long(argc, argv, "m:n:b:r:hV", lo, NULL)) != -1) {
		switch (c) {
		case 'm':
			b.o.model = optarg;
			break;
		case 'n':
			if (opt_u32("tokens", optarg, 1, UINT32_MAX, &b.o.tokens) < 0)
				return EXIT_USAGE;
			break;
		case 'b':
			b.o.budget = strtod(optarg, &end);
			if (*end || !(b.o.budget > 0 && b.o.budget <= 1))
				return fprintf(stderr, "bench-loader: --budget %s: expected a fraction in (0, 1]\n", optarg), EXIT_USAGE;
			break;
		case 'P':
			b.o.plant = strtod(optarg, &end);
			if (*end || !(b.o.plant > 0 && b.o.plant < 1))
				return fprintf(stderr, "bench-loader: --plant %s: expected a fraction in (0, 1)\n", optarg), EXIT_USAGE;
			break;
		case 'B':
			if (!strcmp(optarg, "auto"))
				b.o.backend = CKV_BACKEND_AUTO;
			else if (!strcmp(optarg, "host"))
				b.o.backend = CKV_BACKEND_HOST;
			else if (!strcmp(optarg, "cuda"))
				b.o.backend = CKV_BACKEND_CUDA;
			else
				return fprintf(stderr, "bench-loader: --backend %s: expected auto, host or cuda\n", optarg), EXIT_USAGE;
			break;
		case 'r':
			b.o.runs = atoi(optarg);
			if (b.o.runs < 1 || b.o.runs > MAX_RUNS)
				return fprintf(stderr, "bench-loader: --runs %s: expected 1..%d\n", optarg, MAX_RUNS), EXIT_USAGE;
			break;
		case 'L':
			if (opt_u32("layers", optarg, 1, UINT32_MAX, &b.o.layers) < 0)
				return EXIT_USAGE;
			break;
		case 'C':
			ckv = optarg;
			break;
		case 'Q':
			if (opt_u32("qd", optarg, 1, 4096, &b.o.qd) < 0)
				return EXIT_USAGE;
			break;
		case 'S':
			if (opt_u32("score-tokens", optarg, 1, 65536, &b.o.score_tokens) < 0)
				return EXIT_USAGE;
			break;
		case 'G':
			if (opt_u32("q-per-kv", optarg, 1, 64, &b.o.q_per_kv) < 0)
				return EXIT_USAGE;
			break;
		case 'T':
			if (opt_u32("gather-threads", optarg, 64, 1024, &b.o.gather_threads) < 0)
				return EXIT_USAGE;
			if (b.o.gather_threads % 32) {
				fprintf(stderr, "bench-loader: --gather-threads %s: not a multiple of 32\n",
					optarg);
				return EXIT_USAGE;
			}
			break;
		case 'W':
			if (opt_u32("pairs", optarg, 1, MAX_PAIRS, &b.o.pairs) < 0)
				return EXIT_USAGE;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("bench-loader %s\n", ckv_version());
			return 0;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 1) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (ckv)
		snprintf(b.ckv, sizeof(b.ckv), "%s", ckv);
	else if (getenv("CKV"))
		snprintf(b.ckv, sizeof(b.ckv), "%s", getenv("CKV"));
	else {
		char self[PATH_MAX];

		snprintf(self, sizeof(self), "%s", argv[0]);
		snprintf(b.ckv, sizeof(b.ckv), "%s/ckv", dirname(self));
	}
	if (prepare_store(&b, argv[optind]))
		return 1;
	if (ckv_store_open(b.store, &s, &e) < 0)
		return fail("%s", e.msg);
	if (ckv_hash_parse(&h, b.hash) < 0 || ckv_store_get(s, &h, &b.m, &e) < 0) {
		ckv_store_close(s);
		return fail("prefix %s: %s", b.hash, e.msg);
	}
	ckv_store_close(s);
	b.g = b.m->geom;
	b.mchunks = b.m->chunks;
	b.L = b.o.layers && b.o.layers < b.g.layers ? b.o.layers : b.g.layers;

	if (open_loader(&b, &l, &p))
		goto out;
	rc = choose_sets(&b, l, p);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	p = NULL;
	l = NULL;
	if (rc)
		goto out;
	rc = 1;
	host = aligned_alloc(4096, b.total);
	host2 = aligned_alloc(4096, b.total);
	if (!host || !host2) {
		fail("cannot allocate 2 x %llu bytes", (unsigned long long)b.total);
		goto out;
	}
	memset(host2, 2, b.total);

	for (int r = 0; r < b.o.runs; r++) {
		ckv_loader_stats st;

		drop_cache(&b);
		memset(host, 1, b.total);
		if (raw_read(&b, host, &t_raw[r]))
			goto out;

		/* cold: a fresh loader, an empty arena, no page cache; then warm on it */
		if (fresh_loader(&b, &l, &p, &dev, host2))
			goto out;
		if (loader_fetch(&b, l, p, dev, false, &t_cold[r], NULL, NULL, NULL))
			goto out;
		ckv_loader_get_stats(l, &st);
		amp = (double)(st.bytes_k + st.bytes_v) / (double)b.total;
		/* the loader and the raw reads agree on every byte */
		if (ckv_loader_to_host(l, host2, dev, b.total) < 0 || memcmp(host, host2, b.total) != 0) {
			fail("the loader's chunks differ from the raw reads");
			goto out;
		}
		if (loader_fetch(&b, l, p, dev, false, &t_warm1s[r], NULL, &t_warm1[r], NULL))
			goto out;
		/*
		 * The steady state and its baseline in pairs, one warm pass and
		 * one copy of the same bytes: a slower stretch of the link (the
		 * machine's PCIe is not always ours alone) hits both sides of a
		 * pair, and the ratio is the median of the pairs' ratios. Every
		 * other pair puts the copy first, so that neither side always
		 * runs right after the other.
		 */
		{
			const int np = (int)b.o.pairs;
			double tw[MAX_PAIRS], tc[MAX_PAIRS], tl[MAX_PAIRS], tf[MAX_PAIRS];

			for (int w = 0; w < np; w++) {
				double t0;

				if (w % 2) {
					t0 = now_s();
					if (contiguous_copy(&b, l, dev, host, host2))
						goto out;
					tcopy[w] = now_s() - t0;
				}
				if (loader_fetch(&b, l, p, dev, false, &tw[w], &tc[w], &tl[w], &tf[w]))
					goto out;
				if (w % 2 == 0) {
					t0 = now_s();
					if (contiguous_copy(&b, l, dev, host, host2))
						goto out;
					tcopy[w] = now_s() - t0;
				}
				pair_ratio[r * np + w] = tcopy[w] / tl[w];
				pair_sync[r * np + w] = tcopy[w] / tw[w];
			}
			run_ratio[r] = median(pair_ratio + r * np, np); /* sorts the run's part */
			t_wsync[r] = median(tw, np);
			t_wcalls[r] = median(tc, np);
			t_wfirst[r] = median(tf, np);
			t_warm[r] = median(tl, np);
		}
		t_copy[r] = median(tcopy, (int)b.o.pairs);
#ifdef CKV_HAVE_CUDA
		/* the same pairs, each side enqueued behind GPU work and timed on the device */
		if (ckv_loader_backend(l) == CKV_BACKEND_CUDA) {
			cudaEvent_t ev[2];
			int bad = 0;

			if (cudaEventCreate(&ev[0]) != cudaSuccess || cudaEventCreate(&ev[1]) != cudaSuccess) {
				fail("CUDA events could not be created");
				goto out;
			}
			for (uint32_t w = 0; w < b.o.pairs && !bad; w++) {
				double tp = 0, tq = 0;

				/* the pass first in even pairs, the copy first in odd ones */
				bad = behind_one(&b, l, p, dev, w % 2 == 0, ev, w % 2 ? &tq : &tp) ||
				      behind_one(&b, l, p, dev, w % 2 != 0, ev, w % 2 ? &tp : &tq);
				if (!bad) {
					bh_ratio[nbh] = tq / tp;
					bh_pass[nbh] = tp;
					bh_copy[nbh++] = tq;
				}
			}
			cudaEventDestroy(ev[0]);
			cudaEventDestroy(ev[1]);
			if (bad)
				goto out;
		}
#endif
		ckv_loader_free(l, dev);
		dev = NULL;
		ckv_prefix_close(p);
		ckv_loader_close(l);
		p = NULL;
		l = NULL;

		/* cold again, one layer at a time */
		if (fresh_loader(&b, &l, &p, &dev, host2))
			goto out;
		if (loader_fetch(&b, l, p, dev, true, &t_layer[r], NULL, NULL, NULL))
			goto out;
		if (r + 1 < b.o.runs) {
			ckv_loader_free(l, dev);
			dev = NULL;
			ckv_prefix_close(p);
			ckv_loader_close(l);
			p = NULL;
			l = NULL;
		}
	}
	raw = median(t_raw, b.o.runs);
	cold = median(t_cold, b.o.runs);
	layer = median(t_layer, b.o.runs);
	warm = median(t_warm, b.o.runs);
	copy = median(t_copy, b.o.runs);
	{
		double gb = (double)b.total / 1e9;
		uint64_t nch = b.total / b.g.chunk_bytes;

		printf("bench-loader: %s, %u tokens, %u of %u layers, %u chunks of %llu KiB per layer, "
		       "budget %.2f (%s), %llu chunks = %.1f MiB, backend %s, median of %d runs\n",
		       b.o.model, b.m->tokens, b.L, b.g.layers, b.mchunks,
		       (unsigned long long)(b.g.chunk_bytes >> 10), b.o.budget,
		       b.o.plant > 0 ? "digest top-k of planted query" : "random",
		       (unsigned long long)nch, (double)b.total / 1048576.0,
		       ckv_loader_backend(l) == CKV_BACKEND_CUDA ? "cuda" : "host", b.o.runs);
		printf("| %-38s | %9s | %8s | %-22s |\n", "what", "time ms", "GB/s", "ratio");
		printf("|%s|%s|%s|%s|\n", "----------------------------------------", "-----------",
		       "----------", "------------------------");
		char what[64];

		snprintf(what, sizeof(what), "raw io_uring O_DIRECT, QD %u, merged", b.o.qd);
		printf("| %-38s | %9.2f | %8.2f | %-22s |\n", what, raw * 1e3, gb / raw,
		       "1.00 (cold baseline)");
		printf("| %-38s | %9.2f | %8.2f | %5.2f of raw          |\n", "loader cold, all layers in flight",
		       cold * 1e3, gb / cold, raw / cold);
		printf("| %-38s | %9.2f | %8.2f | %5.2f of raw          |\n", "loader cold, one layer at a time",
		       layer * 1e3, gb / layer, raw / layer);
		printf("| %-38s | %9.2f | %8.2f | %-22s |\n",
		       ckv_loader_backend(l) == CKV_BACKEND_CUDA ? "one pinned cudaMemcpy, same bytes" :
								   "one memcpy, same bytes",
		       copy * 1e3, gb / copy, "1.00 (warm baseline)");
		printf("| %-38s | %9.2f | %8.2f | %5.2f of the copy     |\n",
		       "loader warm, first pass after cold", median(t_warm1, b.o.runs) * 1e3,
		       gb / median(t_warm1, b.o.runs), copy / median(t_warm1, b.o.runs));
		printf("| %-38s | %9.2f | %8.2f | %5.3f of the copy²    |\n", "loader warm (arena hits), steady",
		       warm * 1e3, gb / warm, median(pair_ratio, b.o.runs * (int)b.o.pairs));
		if (nbh) {
			double tp = median(bh_pass, nbh), tq = median(bh_copy, nbh);

			printf("| %-38s | %9.2f | %8.2f | %-22s |\n", "the copy, behind GPU work (device)",
			       tq * 1e3, gb / tq, "1.00 (its baseline)");
			printf("| %-38s | %9.2f | %8.2f | %5.3f of the copy³    |\n",
			       "loader warm, behind GPU work (device)", tp * 1e3, gb / tp, median(bh_ratio, nbh));
		}
		printf("loader warm: the times are until the stream had run every copy (the chunks in place); "
		       "ckv_loader_sync, which also waits for every pin's release, returned after %.2f ms "
		       "(first pass) and %.2f ms (steady, %.3f of the copy²); the steady calls (every start "
		       "and wait) returned after %.2f ms, the first layer's start (its gather enqueued) "
		       "after %.1f us\n",
		       median(t_warm1s, b.o.runs) * 1e3, median(t_wsync, b.o.runs) * 1e3,
		       median(pair_sync, b.o.runs * (int)b.o.pairs), median(t_wcalls, b.o.runs) * 1e3,
		       median(t_wfirst, b.o.runs) * 1e6);
		{
			int np = b.o.runs * (int)b.o.pairs;
			double rlo = pair_ratio[0], rhi = pair_ratio[0];
			double mlo = run_ratio[0], mhi = run_ratio[0];

			for (int i = 1; i < np; i++) {
				rlo = pair_ratio[i] < rlo ? pair_ratio[i] : rlo;
				rhi = pair_ratio[i] > rhi ? pair_ratio[i] : rhi;
			}
			for (int i = 1; i < b.o.runs; i++) {
				mlo = run_ratio[i] < mlo ? run_ratio[i] : mlo;
				mhi = run_ratio[i] > mhi ? run_ratio[i] : mhi;
			}
			printf("² steady state: %d pairs of one warm pass and one copy of the same bytes (%u a "
			       "run, the copy first in every other pair); the median of the pairs' ratios "
			       "(range %.3f-%.3f; each run's own median %.3f-%.3f), against the ratio of the "
			       "medians %.3f\n",
			       np, b.o.pairs, rlo, rhi, mlo, mhi, copy / warm);
		}
		if (nbh)
			printf("³ behind GPU work: %d more pairs, each side enqueued on the stream after %.1f ms "
			       "of GPU work (as a layer's fetch is issued while the model computes): the "
			       "warm pass's starts and waits, or one cudaMemcpyAsync of the same bytes, "
			       "timed by two CUDA events around it (the transfer's device time; the host's "
			       "calls are made while the GPU is busy); the median of the pairs' ratios\n",
			       nbh, BEHIND_S * 1e3);
		printf("read amplification of the cold loader: %.3f (bytes read from disk / bytes selected)\n", amp);
	}
	if (hitpath_table(&b, l, p, copy / b.L) || score_table(&b, l, p, layer / b.L))
		goto out;
	rc = amp > 0.999 && amp < 1.001 ? 0 : fail("read amplification %.3f, expected 1.000", amp);
out:
	if (dev && l)
		ckv_loader_free(l, dev);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	free(host);
	free(host2);
	if (b.sel)
		for (uint32_t i = 0; i < b.L; i++)
			free(b.sel[i]);
	free(b.sel);
	free(b.nsel);
	if (b.m) {
		ckv_manifest_free(b.m);
		free(b.m);
	}
	return rc;
}
