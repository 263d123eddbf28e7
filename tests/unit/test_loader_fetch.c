/*
 * test_loader_fetch.c — chunk-granular fetch through the public API on an
 * embedded store (no daemon, no FUSE): for random chunk sets of random
 * layers, whole chunks and K / V halves land in the destination equal to
 * the exported layer files (`ckv export`), into one buffer or scattered
 * destinations, several fetches in flight at once; cold fetches read
 * exactly the selected bytes (read amplification 1.00), warm ones hit the
 * arena; bad arguments and a corrupt chunk give errors with messages.
 * Runs on the CUDA backend too (CKV_TEST_BACKEND=cuda, tests/gpu).
 */
#include <pthread.h>
#include <stdatomic.h>

#include "loader_int.h"
#include "source.h"
#include "test_loader_util.h"

/*
 * The loader's source with its gets counted, to see which path a fetch
 * took: the warm path pins with pin_resident and never asks for a get.
 */
static const struct ckv_source_ops *real_ops;
static struct ckv_source_ops counted_ops;
static atomic_uint gets;

static int counted_get(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		       const uint32_t *chunks, uint32_t n, ckv_source_cb cb, void *arg)
{
	atomic_fetch_add(&gets, 1);
	return real_ops->get(s, pid, layer, part, chunks, n, cb, arg);
}

static int counted_get_ex(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
			  const uint32_t *chunks, uint32_t n, unsigned flags, ckv_source_cb cb,
			  void *arg, uint8_t *resident, void **handle)
{
	atomic_fetch_add(&gets, 1);
	return real_ops->get_ex(s, pid, layer, part, chunks, n, flags, cb, arg, resident, handle);
}

static void count_gets(ckv_loader *l)
{
	real_ops = l->src->ops;
	counted_ops = *real_ops;
	counted_ops.get = counted_get;
	if (real_ops->get_ex)
		counted_ops.get_ex = counted_get_ex;
	l->src->ops = &counted_ops;
	CHECK(real_ops->pin_resident); /* the embedded source has the warm path */
}

static void fetch_check(ckv_loader *l, ckv_prefix *p, const struct tstore *t, uint32_t layer,
			const uint32_t *chunks, uint32_t n, enum ckv_part part, bool scatter)
{
	uint64_t len = part == CKV_PART_KV ? t->g.chunk_bytes : t->g.half_bytes;
	uint64_t pitch = scatter ? len + 4096 : len;
	uint8_t *dev = tl_alloc(l, pitch * n);
	uint8_t *host = malloc(pitch * n);
	void **ptrs = NULL;
	ckv_fetch *f = NULL;

	CHECK(host);
	if (scatter) { /* chunk i goes to slot n-1-i, with gaps */
		ptrs = malloc(sizeof(*ptrs) * n);
		CHECK(ptrs);
		for (uint32_t i = 0; i < n; i++)
			ptrs[i] = dev + (size_t)(n - 1 - i) * pitch;
	}
	CHECK_RC(ckv_fetch_start(p, layer, chunks, n, part, scatter ? NULL : dev, ptrs, NULL, &f), l);
	CHECK_RC(ckv_fetch_wait(f), l);
	tl_to_host(l, host, dev, pitch * n);
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *got = host + (size_t)(scatter ? n - 1 - i : i) * pitch;

		if (memcmp(got, tstore_chunk(t, layer, chunks[i], part), len) != 0) {
			fprintf(stderr, "layer %u chunk %u part %d scatter %d: bytes differ\n", layer,
				chunks[i], (int)part, scatter);
			exit(1);
		}
	}
	free(ptrs);
	free(host);
	ckv_loader_free(l, dev);
}

/* Corrupt one byte of chunk j of layer `layer` in its segment file. */
static void corrupt(const struct tstore *t, uint32_t layer, uint32_t j)
{
	ckv_store *s;
	ckv_manifest *m;
	ckv_err e;
	char seg[256], path[512], name[32];
	uint32_t start = 0;
	int fd;
	uint8_t b;

	CHECK(ckv_store_open(t->dir, &s, &e) == 0);
	CHECK(ckv_store_get(s, &t->child, &m, &e) == 0);
	for (uint32_t x = 0; x < m->nextents; x++) {
		if (j < start + m->extents[x].count) {
			off_t off = (off_t)(m->extents[x].first + (j - start)) * (off_t)t->g.chunk_bytes + 100;

			ckv_segment_path(m->extents[x].segment, seg, sizeof(seg));
			ckv_layer_name(layer, name);
			snprintf(path, sizeof(path), "%s/%s/%s", t->dir, seg, name);
			fd = open(path, O_RDWR);
			CHECK(fd >= 0);
			CHECK(pread(fd, &b, 1, off) == 1);
			b ^= 0x5a;
			CHECK(pwrite(fd, &b, 1, off) == 1);
			CHECK(fsync(fd) == 0);
			close(fd);
			break;
		}
		start += m->extents[x].count;
	}
	ckv_manifest_free(m);
	free(m);
	ckv_store_close(s);
}

/* Several threads on one loader, each with its own prefix handle (ckvgpu.h). */
struct tharg {
	const struct tstore *t;
	ckv_loader *l;
	uint64_t seed;
	int ok;
};

static void *thread_main(void *arg)
{
	struct tharg *a = arg;
	ckv_prefix *p;
	ckv_shape sh;
	uint32_t set[64];

	if (ckv_prefix_open(a->l, a->t->child_hex, &p) != 0)
		return NULL;
	ckv_prefix_shape(p, &sh);
	for (int it = 0; it < 12; it++) {
		uint32_t layer = (uint32_t)(tl_rand(&a->seed) % sh.layers);
		uint32_t n = tl_subset(&a->seed, sh.chunks, 0.3, set);

		fetch_check(a->l, p, a->t, layer, set, n, (enum ckv_part)(it % 3), it % 2);
		/* each thread sees its own last error */
		set[0] = sh.chunks + (uint32_t)a->seed % 7;
		{
			ckv_fetch *f;
			char want[32];

			snprintf(want, sizeof(want), "chunk %u,", set[0]);
			if (ckv_fetch_start(p, 0, set, 1, CKV_PART_KV, set, NULL, NULL, &f) != -EINVAL ||
			    !strstr(ckv_loader_error(a->l), want))
				goto out;
		}
	}
	a->ok = 1;
out:
	ckv_prefix_close(p);
	return NULL;
}

static void check_threads(const struct tstore *t)
{
	ckv_loader *l = tl_loader(t->dir, 64 << 20, 4 << 20);
	struct tharg a[3];
	pthread_t th[3];

	for (int i = 0; i < 3; i++) {
		a[i] = (struct tharg){ .t = t, .l = l, .seed = 1000u * (unsigned)i + 1 };
		CHECK(pthread_create(&th[i], NULL, thread_main, &a[i]) == 0);
	}
	for (int i = 0; i < 3; i++) {
		CHECK(pthread_join(th[i], NULL) == 0);
		CHECK(a[i].ok);
	}
	ckv_loader_close(l);
}

int main(void)
{
	struct tstore t;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_shape sh;
	ckv_loader_stats st0, st1;
	uint64_t seed = 42;
	uint32_t *set, n, matched = 0, *tok;
	char hash[33];
	int rc;

	tstore_make(&t, "bf16", 6, 2, 64, 700, 1000);
	l = tl_loader(t.dir, 64 << 20, 0);
	CHECK(!ckv_loader_remote(l));
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	CHECK(strcmp(sh.hash, t.child_hex) == 0 && strcmp(sh.dtype, "bf16") == 0);
	CHECK(sh.layers == 6 && sh.kv_heads == 2 && sh.head_dim == 64 && sh.chunk_tokens == 16);
	CHECK(sh.tokens == 1000 && sh.chunks == t.child_chunks && sh.chunks == 63);
	CHECK(sh.chunk_bytes == 8192 && sh.half_bytes == 4096);

	/* match: the stored tokens plus more; a key=value shape and a bad one */
	tok = malloc(sizeof(*tok) * 1100);
	CHECK(tok);
	for (uint32_t i = 0; i < 1100; i++)
		tok[i] = (uint32_t)(tl_mix(i) % 150000);
	CHECK_RC(ckv_loader_match(l, "model=test/loader,dtype=bf16,layers=6,kv_heads=2,head_dim=64,chunk=16",
				  tok, 1100, hash, &matched), l);
	CHECK(matched == 1000 && strcmp(hash, t.child_hex) == 0);
	CHECK_RC(ckv_loader_match(l, "model=test/loader,dtype=bf16,layers=6,kv_heads=2,head_dim=64",
				  tok, 800, hash, &matched), l);
	CHECK(matched == 800 && strcmp(hash, t.child_hex) == 0); /* 800 tokens of the extension */
	tok[10] ^= 1;
	CHECK_RC(ckv_loader_match(l, "model=test/loader,dtype=bf16,layers=6,kv_heads=2,head_dim=64",
				  tok, 800, hash, &matched), l);
	CHECK(matched == 0 && hash[0] == 0);
	tok[10] ^= 1;
	CHECK_RC(ckv_loader_match(l, "qwen2.5-0.5b", tok, 1100, hash, &matched), l);
	CHECK(matched == 0);
	rc = ckv_loader_match(l, "model=x,layers=2,bogus=3", tok, 10, hash, &matched);
	CHECK(rc == -EINVAL && strstr(ckv_loader_error(l), "bogus"));
	free(tok);

	/* random chunk sets, every part, contiguous and scattered destinations */
	set = malloc(sizeof(*set) * sh.chunks);
	CHECK(set);
	for (int it = 0; it < 36; it++) {
		uint32_t layer = (uint32_t)(tl_rand(&seed) % sh.layers);
		double frac = 0.05 + 0.6 * (tl_unif(&seed) * 0.5 + 0.5);

		n = tl_subset(&seed, sh.chunks, frac, set);
		fetch_check(l, p, &t, layer, set, n, (enum ckv_part)(it % 3), it % 2);
	}
	/* the whole layer, the last (partial) chunk, duplicates, nothing */
	for (uint32_t j = 0; j < sh.chunks; j++)
		set[j] = j;
	fetch_check(l, p, &t, 5, set, sh.chunks, CKV_PART_KV, false);
	set[0] = sh.chunks - 1;
	fetch_check(l, p, &t, 0, set, 1, CKV_PART_V, false);
	set[0] = set[1] = 7;
	fetch_check(l, p, &t, 3, set, 2, CKV_PART_KV, false);
	{
		ckv_fetch *f;

		CHECK_RC(ckv_fetch_start(p, 1, set, 0, CKV_PART_KV, NULL, NULL, NULL, &f), l);
		CHECK_RC(ckv_fetch_wait(f), l);
	}

	/* several fetches in flight */
	{
		ckv_fetch *f[3];
		uint8_t *dev[3], *host = malloc(sh.chunk_bytes * 20);
		uint32_t c3[20];

		CHECK(host);
		for (uint32_t i = 0; i < 20; i++)
			c3[i] = i * 3;
		for (int i = 0; i < 3; i++) {
			dev[i] = tl_alloc(l, sh.chunk_bytes * 20);
			CHECK_RC(ckv_fetch_start(p, (uint32_t)i + 2, c3, 20, CKV_PART_KV, dev[i], NULL, NULL, &f[i]), l);
		}
		for (int i = 2; i >= 0; i--) {
			CHECK_RC(ckv_fetch_wait(f[i]), l);
			tl_to_host(l, host, dev[i], sh.chunk_bytes * 20);
			for (uint32_t k = 0; k < 20; k++)
				CHECK(memcmp(host + k * sh.chunk_bytes,
					     tstore_chunk(&t, (uint32_t)i + 2, c3[k], CKV_PART_KV),
					     sh.chunk_bytes) == 0);
			ckv_loader_free(l, dev[i]);
		}
		free(host);
	}

	/* bad arguments */
	{
		ckv_fetch *f = NULL, *q_f = NULL;
		uint8_t *dev = tl_alloc(l, sh.chunk_bytes + 16);
		ckv_prefix *q = NULL;

		set[0] = sh.chunks;
		CHECK(ckv_fetch_start(p, 0, set, 1, CKV_PART_KV, dev, NULL, NULL, &f) == -EINVAL);
		CHECK(strstr(ckv_loader_error(l), "chunk 63"));
		set[0] = 0;
		CHECK(ckv_fetch_start(p, 6, set, 1, CKV_PART_KV, dev, NULL, NULL, &f) == -EINVAL);
		CHECK(strstr(ckv_loader_error(l), "layer 6"));
		CHECK(ckv_fetch_start(p, 0, set, 1, (enum ckv_part)7, dev, NULL, NULL, &f) == -EINVAL);
		CHECK(ckv_fetch_start(p, 0, set, 1, CKV_PART_KV, NULL, NULL, NULL, &f) == -EINVAL);
		/*
		 * A resident chunk to a misaligned destination: the start enqueues
		 * the copy, the backend refuses it, and the wait reports that
		 * with its own message even after another call failed between.
		 */
		CHECK_RC(ckv_fetch_start(p, 0, set, 1, CKV_PART_KV, dev, NULL, NULL, &f), l);
		CHECK_RC(ckv_fetch_wait(f), l);
		{
			void *bad = dev + 8;

			CHECK_RC(ckv_fetch_start(p, 0, set, 1, CKV_PART_KV, NULL, &bad, NULL, &f), l);
			CHECK(ckv_fetch_start(p, 6, set, 1, CKV_PART_KV, dev, NULL, NULL, &q_f) == -EINVAL);
			CHECK(strstr(ckv_loader_error(l), "layer 6"));
			CHECK(ckv_fetch_wait(f) == -EINVAL);
			CHECK(strstr(ckv_loader_error(l), "copy failed"));
		}
		CHECK(ckv_prefix_open(l, "xyz", &q) == -EINVAL && strstr(ckv_loader_error(l), "hex"));
		CHECK(ckv_prefix_open(l, "00000000000000000000000000000000", &q) == -ENOENT);
		CHECK(strstr(ckv_loader_error(l), "not stored"));
		ckv_loader_free(l, dev);
	}
	/* feedback and read-ahead hints are accepted; bad ones are not */
	{
		float sc[3] = { 1, 2, 3 }, bad = NAN;
		uint32_t c[3] = { 1, 2, 3 };

		CHECK_RC(ckv_score_feedback(p, 1, c, sc, 3), l);
		CHECK(ckv_score_feedback(p, 1, c, &bad, 1) == -EINVAL);
		CHECK_RC(ckv_prefetch(p, 4, c, 3), l);
	}
	ckv_prefix_close(p);
	ckv_loader_close(l);

	/* cold: exactly the selected bytes from disk; warm: arena hits, on the warm path (no get) */
	l = tl_loader(t.dir, 64 << 20, 0);
	count_gets(l);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	n = tl_subset(&seed, sh.chunks, 0.2, set);
	fetch_check(l, p, &t, 2, set, n, CKV_PART_KV, false);
	CHECK(atomic_load(&gets) == 1);
	ckv_loader_get_stats(l, &st0);
	CHECK(st0.misses == n && st0.hits_arena == 0 && st0.hits_gpu == 0);
	CHECK(st0.bytes_k + st0.bytes_v == (uint64_t)n * sh.chunk_bytes);
	CHECK(st0.bytes_k == (uint64_t)n * sh.half_bytes);
	fetch_check(l, p, &t, 2, set, n, CKV_PART_KV, true);
	CHECK(atomic_load(&gets) == 1);
	ckv_loader_get_stats(l, &st1);
	CHECK(st1.misses == n && st1.hits_arena == n && st1.bytes_k + st1.bytes_v == st0.bytes_k + st0.bytes_v);
	/* warm: the start enqueues the copy (host backend: it is done on return) */
	if (ckv_loader_backend(l) == CKV_BACKEND_HOST) {
		uint8_t *dev = tl_alloc(l, (uint64_t)n * sh.chunk_bytes);
		ckv_fetch *f;

		memset(dev, 0, (size_t)n * sh.chunk_bytes);
		CHECK_RC(ckv_fetch_start(p, 2, set, n, CKV_PART_KV, dev, NULL, NULL, &f), l);
		for (uint32_t k = 0; k < n; k++)
			CHECK(memcmp(dev + (size_t)k * sh.chunk_bytes,
				     tstore_chunk(&t, 2, set[k], CKV_PART_KV), sh.chunk_bytes) == 0);
		CHECK_RC(ckv_fetch_wait(f), l);
		ckv_loader_free(l, dev);
		ckv_loader_get_stats(l, &st1);
	}
	fetch_check(l, p, &t, 3, set, n, CKV_PART_K, false);
	ckv_loader_get_stats(l, &st0);
	CHECK(st0.bytes_k - st1.bytes_k == (uint64_t)n * sh.half_bytes && st0.bytes_v == st1.bytes_v);
	fetch_check(l, p, &t, 3, set, n, CKV_PART_V, false);
	ckv_loader_get_stats(l, &st1);
	CHECK(st1.bytes_v - st0.bytes_v == (uint64_t)n * sh.half_bytes && st1.bytes_k == st0.bytes_k);
	ckv_prefix_close(p);
	ckv_loader_close(l);

	/*
	 * Pins go back, on both paths, in an arena of 80 chunks: a whole layer
	 * (63 chunks) cold, then warm over and over (the warm path: no get);
	 * then a set of another layer only partly in the arena, which the warm
	 * path must leave unpinned (the general path reads the rest: one get,
	 * the resident part counted as hits); then two more whole layers, each
	 * of which fits only by evicting what came before.
	 */
	l = tl_loader(t.dir, 80 * sh.chunk_bytes, 0);
	count_gets(l);
	atomic_store(&gets, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	for (uint32_t j = 0; j < sh.chunks; j++)
		set[j] = j;
	for (int it = 0; it < 5; it++)
		fetch_check(l, p, &t, 4, set, sh.chunks, CKV_PART_KV, it % 2);
	CHECK(atomic_load(&gets) == 1);
	ckv_loader_get_stats(l, &st0);
	CHECK(st0.misses == sh.chunks && st0.hits_arena == 4 * sh.chunks);
	fetch_check(l, p, &t, 2, set, 20, CKV_PART_KV, false); /* chunks 0-19 */
	fetch_check(l, p, &t, 2, set, 30, CKV_PART_KV, true);  /* 0-19 resident, 20-29 not */
	CHECK(atomic_load(&gets) == 3);
	ckv_loader_get_stats(l, &st1);
	CHECK(st1.misses - st0.misses == 30 && st1.hits_arena - st0.hits_arena == 20);
	CHECK(st1.bytes_k + st1.bytes_v - st0.bytes_k - st0.bytes_v == 30 * sh.chunk_bytes);
	fetch_check(l, p, &t, 0, set, sh.chunks, CKV_PART_KV, false);
	fetch_check(l, p, &t, 1, set, sh.chunks, CKV_PART_KV, false);
	ckv_loader_get_stats(l, &st0);
	CHECK(st0.misses - st1.misses == 2 * sh.chunks);
	ckv_prefix_close(p);
	ckv_loader_close(l);

	/* a layer of more than 256 chunks: the warm path's lists outgrow its stack */
	{
		struct tstore big;
		ckv_shape bsh;
		uint32_t *all;

		tstore_make(&big, "bf16", 2, 1, 16, 100, 16 * 300);
		l = tl_loader(big.dir, 64 << 20, 0);
		count_gets(l);
		atomic_store(&gets, 0);
		CHECK_RC(ckv_prefix_open(l, big.child_hex, &p), l);
		ckv_prefix_shape(p, &bsh);
		CHECK(bsh.chunks == 300);
		all = malloc(sizeof(*all) * bsh.chunks);
		CHECK(all);
		for (uint32_t j = 0; j < bsh.chunks; j++)
			all[j] = bsh.chunks - 1 - j;
		fetch_check(l, p, &big, 1, all, 290, CKV_PART_KV, false);
		fetch_check(l, p, &big, 1, all, 290, CKV_PART_KV, true);
		fetch_check(l, p, &big, 1, all + 10, 280, CKV_PART_V, false);
		fetch_check(l, p, &big, 1, all + 10, 280, CKV_PART_V, true);
		CHECK(atomic_load(&gets) == 2);
		ckv_loader_get_stats(l, &st0);
		CHECK(st0.misses == 290 + 280 && st0.hits_arena == 290 + 280);
		free(all);
		ckv_prefix_close(p);
		ckv_loader_close(l);
		tstore_free(&big);
	}

	/* a corrupt chunk: -EIO naming it; its neighbours still load */
	corrupt(&t, 1, 50);
	l = tl_loader(t.dir, 64 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	{
		ckv_fetch *f;
		uint8_t *dev = tl_alloc(l, sh.chunk_bytes * 3);

		set[0] = 49;
		set[1] = 50;
		set[2] = 51;
		CHECK_RC(ckv_fetch_start(p, 1, set, 3, CKV_PART_KV, dev, NULL, NULL, &f), l);
		rc = ckv_fetch_wait(f);
		CHECK(rc == -EIO && strstr(ckv_loader_error(l), "chunk 50"));
		ckv_loader_free(l, dev);
	}
	set[0] = 49;
	set[1] = 51;
	fetch_check(l, p, &t, 1, set, 2, CKV_PART_KV, false);
	ckv_prefix_close(p);
	ckv_loader_close(l);

	check_threads(&t);

	/* not a store */
	{
		ckv_loader_opts o = { .backend = CKV_BACKEND_HOST };

		CHECK(ckv_loader_open("/nonexistent/ckv", &o, &l) == -ENOENT);
		CHECK(strstr(ckv_loader_error(NULL), "/nonexistent/ckv"));
		CHECK(ckv_loader_open(t.exp, &o, &l) < 0);
		CHECK(strstr(ckv_loader_error(NULL), t.exp));
	}
	free(set);
	tstore_free(&t);
	printf("ok\n");
	return 0;
}
