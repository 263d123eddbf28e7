/*
 * test_loader_gpu.c — the loader on the CUDA backend (exit 77 without a
 * GPU): fetches of every part into device memory on a non-default stream
 * equal the exported bytes; every pipeline mode's views on the device equal
 * the host backend's views (same chunk ids, same bytes); the GPU tier serves
 * a second pass device to device; digest scores and key-copy mass scores
 * on the device equal the CPU's. (The unit tests tests/unit/test_loader_*.c also run on CUDA with
 * CKV_TEST_BACKEND=cuda.)
 */
#include <cuda_runtime.h>

#include "../unit/test_loader_util.h"

#ifdef __SANITIZE_ADDRESS__
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
	return "protect_shadow_gap=0"; /* CUDA maps memory where ASan's shadow gap would be */
}
#endif

static ckv_loader *open_backend(const char *dir, ckv_backend_kind k, uint64_t tier)
{
	ckv_loader_opts o = { .backend = k, .arena_bytes = 128 << 20, .gpu_cache_bytes = tier };
	ckv_loader *l = NULL;
	int rc = ckv_loader_open(dir, &o, &l);

	if (rc && k == CKV_BACKEND_CUDA) {
		printf("no CUDA device: %s\n", ckv_loader_error(NULL));
		exit(77);
	}
	CHECK(rc == 0);
	return l;
}

static void check_fetch(const struct tstore *t, ckv_loader *l, cudaStream_t stream)
{
	ckv_prefix *p;
	ckv_shape sh;
	uint64_t seed = 3;
	uint32_t *set;
	uint8_t *dev, *host;

	CHECK_RC(ckv_prefix_open(l, t->child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	set = malloc(sizeof(*set) * sh.chunks);
	host = malloc(sh.chunk_bytes * sh.chunks);
	CHECK(set && host);
	CHECK(cudaMalloc((void **)&dev, sh.chunk_bytes * sh.chunks) == cudaSuccess);
	for (int it = 0; it < 30; it++) {
		enum ckv_part part = (enum ckv_part)(it % 3);
		uint64_t len = part == CKV_PART_KV ? sh.chunk_bytes : sh.half_bytes;
		uint32_t layer = (uint32_t)(tl_rand(&seed) % sh.layers);
		uint32_t n = tl_subset(&seed, sh.chunks, 0.05 + 0.1 * (it % 5), set);
		ckv_fetch *f;

		CHECK_RC(ckv_fetch_start(p, layer, set, n, part, dev, NULL, stream, &f), l);
		CHECK_RC(ckv_fetch_wait(f), l);
		CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
		CHECK(cudaMemcpy(host, dev, len * n, cudaMemcpyDeviceToHost) == cudaSuccess);
		for (uint32_t i = 0; i < n; i++)
			CHECK(memcmp(host + i * len, tstore_chunk(t, layer, set[i], part), len) == 0);
	}
	cudaFree(dev);
	free(host);
	free(set);
	ckv_prefix_close(p);
}

/* One pass of a mode on a loader: chunk ids and bytes of every view, on the host. */
static void pass(ckv_loader *l, const char *hash, const ckv_pipeline_opts *o, float **q,
		 uint32_t **ids, uint32_t *nids, uint8_t **bytes, ckv_pipeline_stats *st)
{
	ckv_prefix *p;
	ckv_pipeline *pl;
	ckv_shape sh;

	CHECK_RC(ckv_prefix_open(l, hash, &p), l);
	ckv_prefix_shape(p, &sh);
	CHECK_RC(ckv_pipeline_open(p, o, &pl), l);
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		ckv_layer_view v;

		CHECK_RC(ckv_pipeline_layer(pl, layer, q[layer], &v), l);
		nids[layer] = v.nchunks;
		ids[layer] = malloc(sizeof(uint32_t) * v.nchunks);
		bytes[layer] = malloc(sh.chunk_bytes * v.nchunks);
		CHECK(ids[layer] && bytes[layer]);
		memcpy(ids[layer], v.chunks, sizeof(uint32_t) * v.nchunks);
		CHECK_RC(ckv_loader_sync(l, o->stream), l);
		CHECK_RC(ckv_loader_to_host(l, bytes[layer], v.kv, sh.chunk_bytes * v.nchunks), l);
	}
	ckv_pipeline_get_stats(pl, st);
	ckv_pipeline_close(pl);
	ckv_prefix_close(p);
}

static void check_modes(const struct tstore *t, cudaStream_t stream)
{
	static const struct {
		ckv_mode mode;
		bool keys, noprefetch;
	} modes[] = {
		{ CKV_MODE_FULL, false, false },   { CKV_MODE_PERIOD, false, false },
		{ CKV_MODE_PERIOD, true, false },  { CKV_MODE_LAYER, false, false },
		{ CKV_MODE_LAYER, false, true },   { CKV_MODE_RERANK, false, false },
	};
	uint32_t L = t->g.layers;
	uint64_t seed = 17;
	float **q = calloc(L, sizeof(*q));

	CHECK(q);
	for (uint32_t l = 0; l < L; l++)
		q[l] = tl_query(&seed, 4, 2 * t->g.kv_heads, t->g.head_dim);
	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		ckv_pipeline_opts o = { .mode = modes[i].mode, .budget = 0.15, .period = 4, .subperiod = 2,
					.q_heads = 2 * t->g.kv_heads, .q_tokens = 4,
					.period_keys = modes[i].keys, .no_prefetch = modes[i].noprefetch };
		uint32_t *ids[2][64], nids[2][64];
		uint8_t *bytes[2][64];
		ckv_pipeline_stats st[3];
		ckv_loader *host = open_backend(t->dir, CKV_BACKEND_HOST, 0);
		ckv_loader *cuda = open_backend(t->dir, CKV_BACKEND_CUDA, 64 << 20);

		CHECK(L <= 64);
		pass(host, t->child_hex, &o, q, ids[0], nids[0], bytes[0], &st[0]);
		o.stream = stream;
		pass(cuda, t->child_hex, &o, q, ids[1], nids[1], bytes[1], &st[1]);
		for (uint32_t l = 0; l < L; l++) {
			CHECK(nids[0][l] == nids[1][l]);
			CHECK(memcmp(ids[0][l], ids[1][l], sizeof(uint32_t) * nids[0][l]) == 0);
			CHECK(memcmp(bytes[0][l], bytes[1][l], t->g.chunk_bytes * nids[0][l]) == 0);
			for (uint32_t k = 0; k < nids[0][l]; k++)
				CHECK(memcmp(bytes[0][l] + k * t->g.chunk_bytes,
					     tstore_chunk(t, l, ids[0][l][k], CKV_PART_KV), t->g.chunk_bytes) == 0);
			free(ids[1][l]);
			free(bytes[1][l]);
		}
		CHECK(st[1].chunks_used == st[0].chunks_used && st[1].bytes_needed == st[0].bytes_needed);
		if (modes[i].mode == CKV_MODE_FULL || modes[i].noprefetch) {
			/* nothing speculative: both read exactly the same bytes */
			CHECK(st[1].bytes_k + st[1].bytes_v == st[0].bytes_k + st[0].bytes_v);
		} else if (modes[i].mode != CKV_MODE_RERANK && !modes[i].keys) {
			/*
			 * speculative reads the idle queue had not started when their
			 * layer came are withdrawn (timing): on either backend every
			 * chunk request is a used chunk or a dropped speculation
			 */
			for (int b = 0; b < 2; b++)
				CHECK(st[b].misses + st[b].hits_arena == st[b].chunks_used + st[b].spec_wasted &&
				      st[b].bytes_k + st[b].bytes_v == st[b].misses * t->g.chunk_bytes);
		}
		/* the second pass on the GPU: from the tier, device to device, same bytes */
		pass(cuda, t->child_hex, &o, q, ids[1], nids[1], bytes[1], &st[2]);
		CHECK(st[2].hits_gpu >= st[2].chunks_used);
		/*
		 * every used chunk came from the tier; a disk read now is a
		 * speculation the first pass withdrew before reading it
		 */
		if (modes[i].mode == CKV_MODE_FULL || modes[i].noprefetch)
			CHECK(st[2].misses == 0);
		else
			CHECK(st[2].misses <= st[2].spec_wasted);
		for (uint32_t l = 0; l < L; l++) {
			CHECK(memcmp(bytes[0][l], bytes[1][l], t->g.chunk_bytes * nids[0][l]) == 0);
			free(ids[0][l]);
			free(bytes[0][l]);
			free(ids[1][l]);
			free(bytes[1][l]);
		}
		printf("%-6s%s%s: host = cuda; cuda pass 2: %llu tier hits for %llu chunks, wait %.4f s\n",
		       ckv_mode_name(modes[i].mode), modes[i].keys ? " (keys)" : "",
		       modes[i].noprefetch ? " (no prefetch)" : "", (unsigned long long)st[2].hits_gpu,
		       (unsigned long long)st[2].chunks_used, st[1].wait_s);
		ckv_loader_close(host);
		ckv_loader_close(cuda);
	}
	for (uint32_t l = 0; l < L; l++)
		free(q[l]);
	free(q);
}

static void check_digests(const struct tstore *t, cudaStream_t stream)
{
	ckv_loader *l = open_backend(t->dir, CKV_BACKEND_CUDA, 0);
	ckv_prefix *p;
	ckv_shape sh;
	uint64_t seed = 5;
	float *q, *qd, *sd, *cpu, *dev;
	size_t nq;

	CHECK_RC(ckv_prefix_open(l, t->child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	nq = (size_t)8 * 2 * sh.kv_heads * sh.head_dim;
	q = tl_query(&seed, 8, 2 * sh.kv_heads, sh.head_dim);
	cpu = malloc(sizeof(float) * sh.chunks);
	dev = malloc(sizeof(float) * sh.chunks);
	CHECK(cpu && dev);
	CHECK(cudaMalloc((void **)&qd, nq * sizeof(float)) == cudaSuccess);
	CHECK(cudaMalloc((void **)&sd, sh.chunks * sizeof(float)) == cudaSuccess);
	CHECK(cudaMemcpy(qd, q, nq * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		CHECK_RC(ckv_digest_scores(p, layer, q, 8, 2 * sh.kv_heads, cpu), l);
		CHECK_RC(ckv_digest_scores_device(p, layer, qd, 8, 2 * sh.kv_heads, sd, stream), l);
		CHECK(cudaMemcpy(dev, sd, sh.chunks * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
		for (uint32_t j = 0; j < sh.chunks; j++)
			CHECK(fabsf(cpu[j] - dev[j]) <= 1e-3f * (1 + fabsf(cpu[j])));
	}
	cudaFree(qd);
	cudaFree(sd);
	free(q);
	free(cpu);
	free(dev);
	ckv_prefix_close(p);
	ckv_loader_close(l);
}

/*
 * Key-copy mass scores on the device against the CPU's, a Qwen2.5-7B-like
 * head layout (4 kv heads of 128, 7 query heads each, 16 new tokens),
 * with and without the new tokens' keys.
 */
static void check_keyq(cudaStream_t stream)
{
	struct tstore t;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_shape sh;
	uint64_t seed = 9;
	const uint32_t T = 16, qh = 28;
	float *q, *k, *qd, *kd, *sd, *cpu, *dev;
	size_t nq, nk;
	double worst = 0;

	tstore_make(&t, "fp16", 3, 4, 128, 1500, 2100);
	l = open_backend(t.dir, CKV_BACKEND_CUDA, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	nq = (size_t)T * qh * sh.head_dim;
	nk = (size_t)T * sh.kv_heads * sh.head_dim;
	q = tl_query(&seed, T, qh, sh.head_dim);
	k = tl_query(&seed, T, sh.kv_heads, sh.head_dim);
	cpu = malloc(sizeof(float) * sh.chunks);
	dev = malloc(sizeof(float) * sh.chunks);
	CHECK(cpu && dev);
	CHECK(cudaMalloc((void **)&qd, nq * sizeof(float)) == cudaSuccess);
	CHECK(cudaMalloc((void **)&kd, nk * sizeof(float)) == cudaSuccess);
	CHECK(cudaMalloc((void **)&sd, sh.chunks * sizeof(float)) == cudaSuccess);
	CHECK(cudaMemcpy(qd, q, nq * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
	CHECK(cudaMemcpy(kd, k, nk * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
	for (uint32_t layer = 0; layer < sh.layers; layer++)
		for (int with = 0; with < 2; with++) {
			CHECK_RC(ckv_keyq_scores(p, layer, q, with ? k : NULL, T, qh, cpu), l);
			CHECK_RC(ckv_keyq_scores_device(p, layer, qd, with ? kd : NULL, T, qh, sd, stream), l);
			CHECK(cudaMemcpy(dev, sd, sh.chunks * sizeof(float), cudaMemcpyDeviceToHost) ==
			      cudaSuccess);
			for (uint32_t j = 0; j < sh.chunks; j++) {
				double err = fabs((double)dev[j] - cpu[j]) / (fabs(cpu[j]) + 1e-6);

				CHECK(err <= 1e-3);
				worst = err > worst ? err : worst;
			}
		}
	printf("keyq scores on the device: %u chunks, worst relative difference to the CPU %.2e\n",
	       sh.chunks, worst);
	cudaFree(qd);
	cudaFree(kd);
	cudaFree(sd);
	free(q);
	free(k);
	free(cpu);
	free(dev);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	tstore_free(&t);
}

int main(void)
{
	struct tstore t;
	cudaStream_t stream;
	int n = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		printf("no CUDA device\n");
		return 77;
	}
	CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
	tstore_make(&t, "bf16", 9, 2, 64, 700, 1000);
	{
		ckv_loader *l = open_backend(t.dir, CKV_BACKEND_CUDA, 0);

		CHECK(ckv_loader_backend(l) == CKV_BACKEND_CUDA);
		check_fetch(&t, l, stream);
		ckv_loader_close(l);
	}
	check_modes(&t, stream);
	check_digests(&t, stream);
	tstore_free(&t);
	check_keyq(stream);
	cudaStreamDestroy(stream);
	printf("ok\n");
	return 0;
}
