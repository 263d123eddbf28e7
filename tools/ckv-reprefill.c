/*
 * ckv-reprefill — one Re-Prefill pass over a stored prefix through
 * libckvgpu's pipeline, as an inference engine would run it: layer by layer,
 * the layer's query in hand, a stand-in for the layer's compute in between
 * (a busy wait of --compute-ms), the loader reading ahead meanwhile. Prints
 * what was read from disk, the read amplification and the time (total and
 * waiting on I/O) for each mode given.
 *
 * Queries are synthetic (a fixed-seed normal draw per layer): the point is
 * the I/O, not the model. Each mode runs on a fresh loader (an empty arena).
 *
 * usage: ckv-reprefill [-m MODE]... [-b BUDGET] [--backend K] [--compute-ms X] STORE HASH
 * Exit status: 0 ok, 1 failure, 2 usage.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ckv_format.h"
#include "ckvgpu.h"

#define EXIT_USAGE 2
#define MAX_MODES 8

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The layer's compute: the loader's engine thread reads meanwhile. */
static void compute(double seconds)
{
	double end = now_s() + seconds;

	while (now_s() < end)
		;
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static float normal(uint64_t *s)
{
	double u1 = ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0;
	double u2 = (double)(splitmix(s) >> 11) / 9007199254740992.0;

	return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

static void human(double bytes, char *out, size_t len)
{
	const char *u[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	int i = 0;

	while (bytes >= 1024 && i < 4) {
		bytes /= 1024;
		i++;
	}
	snprintf(out, len, i ? "%.1f %s" : "%.0f %s", bytes, u[i]);
}

struct run_opts {
	ckv_backend_kind backend;
	double budget, compute_s;
	uint32_t q_tokens;
	bool no_prefetch;
};

static int run(const char *store, const char *hash, ckv_mode mode, const struct run_opts *ro)
{
	ckv_loader_opts lo = { .backend = ro->backend };
	ckv_pipeline_opts po = { .mode = mode, .budget = mode == CKV_MODE_FULL ? 1 : ro->budget,
				 .q_tokens = ro->q_tokens, .no_prefetch = ro->no_prefetch };
	ckv_loader *l = NULL;
	ckv_prefix *p = NULL;
	ckv_pipeline *pl = NULL;
	ckv_pipeline_stats st;
	ckv_shape sh;
	float *q = NULL;
	uint64_t seed = 12345;
	size_t nq;
	double t0, t;
	char b1[32], b4[32];
	int rc = 1;

	if (ckv_loader_open(store, &lo, &l) < 0) {
		fprintf(stderr, "ckv-reprefill: %s\n", ckv_loader_error(NULL));
		return 1;
	}
	if (ckv_prefix_open(l, hash, &p) < 0) {
		fprintf(stderr, "ckv-reprefill: %s\n", ckv_loader_error(l));
		goto out;
	}
	ckv_prefix_shape(p, &sh);
	po.q_heads = 2 * sh.kv_heads; /* GQA, 2 query heads per KV head */
	nq = (size_t)po.q_tokens * po.q_heads * sh.head_dim;
	q = malloc(sizeof(*q) * nq);
	if (!q) {
		fprintf(stderr, "ckv-reprefill: out of memory\n");
		goto out;
	}
	t0 = now_s();
	if (ckv_pipeline_open(p, &po, &pl) < 0) {
		fprintf(stderr, "ckv-reprefill: %s\n", ckv_loader_error(l));
		goto out;
	}
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		ckv_layer_view v;

		for (size_t i = 0; i < nq; i++)
			q[i] = normal(&seed);
		if (ckv_pipeline_layer(pl, layer, q, &v) < 0) {
			fprintf(stderr, "ckv-reprefill: %s\n", ckv_loader_error(l));
			goto out;
		}
		compute(ro->compute_s); /* attention over v.kv, the MLP, ... */
	}
	if (ckv_loader_sync(l, po.stream) < 0) {
		fprintf(stderr, "ckv-reprefill: %s\n", ckv_loader_error(l));
		goto out;
	}
	t = now_s() - t0;
	ckv_pipeline_get_stats(pl, &st);
	human((double)(st.bytes_k + st.bytes_v), b1, sizeof(b1));
	human((double)st.bytes_needed, b4, sizeof(b4));
	printf("| %-6s | %-4s | %6.2f | %8llu / %-8llu | %10s | %10s | %5.3f | %9.1f | %9.1f | %6llu / %-6llu |\n",
	       ckv_mode_name(mode), ckv_loader_backend(l) == CKV_BACKEND_CUDA ? "cuda" : "host",
	       po.budget, (unsigned long long)st.chunks_used,
	       (unsigned long long)sh.chunks * sh.layers, b1, b4,
	       st.bytes_needed ? (double)(st.bytes_k + st.bytes_v) / (double)st.bytes_needed : 0.0,
	       t * 1e3, st.wait_s * 1e3, (unsigned long long)st.spec_used,
	       (unsigned long long)st.spec_wasted);
	rc = 0;
out:
	ckv_pipeline_close(pl);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	free(q);
	return rc;
}

static void usage(FILE *to)
{
	fprintf(to,
		"usage: ckv-reprefill [options] STORE HASH\n\n"
		"One Re-Prefill pass over prefix HASH of STORE (a store directory: embedded engine;\n"
		"or a ckvfs mountpoint) through the loader pipeline; prints bytes read, read\n"
		"amplification and time per mode.\n\n"
		"  -m, --mode M       full, period, layer or rerank; repeat for several (default: full, layer)\n"
		"  -b, --budget B     fraction of chunks per layer (default 0.1)\n"
		"  --backend K        auto, host or cuda (default auto)\n"
		"  --compute-ms X     per-layer compute stand-in in ms (default 1)\n"
		"  --q-tokens N       new tokens (default 16)\n"
		"  --no-prefetch      issue each layer's reads only when it is reached\n"
		"  -h, --help  -V, --version\n");
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "mode", required_argument, NULL, 'm' },
		{ "budget", required_argument, NULL, 'b' },
		{ "backend", required_argument, NULL, 'B' },
		{ "compute-ms", required_argument, NULL, 'c' },
		{ "q-tokens", required_argument, NULL, 'q' },
		{ "no-prefetch", no_argument, NULL, 'N' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	struct run_opts ro = { .backend = CKV_BACKEND_AUTO, .budget = 0.1, .compute_s = 1e-3,
			       .q_tokens = 16 };
	ckv_mode modes[MAX_MODES];
	int nmodes = 0, c, rc = 0;
	char *end;

	while ((c = getopt_long(argc, argv, "m:b:hV", lo, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (nmodes == MAX_MODES || ckv_mode_parse(optarg, &modes[nmodes]) < 0) {
				fprintf(stderr, "ckv-reprefill: --mode %s: expected full, period, layer or rerank\n", optarg);
				return EXIT_USAGE;
			}
			nmodes++;
			break;
		case 'b':
			ro.budget = strtod(optarg, &end);
			if (*end || !(ro.budget > 0 && ro.budget <= 1)) {
				fprintf(stderr, "ckv-reprefill: --budget %s: expected a fraction in (0, 1]\n", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'B':
			if (!strcmp(optarg, "auto"))
				ro.backend = CKV_BACKEND_AUTO;
			else if (!strcmp(optarg, "host"))
				ro.backend = CKV_BACKEND_HOST;
			else if (!strcmp(optarg, "cuda"))
				ro.backend = CKV_BACKEND_CUDA;
			else {
				fprintf(stderr, "ckv-reprefill: --backend %s: expected auto, host or cuda\n", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'c':
			ro.compute_s = strtod(optarg, &end) * 1e-3;
			if (*end || !(ro.compute_s >= 0 && ro.compute_s < 10)) {
				fprintf(stderr, "ckv-reprefill: --compute-ms %s: expected 0 .. 10000\n", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'q': {
			unsigned long v = strtoul(optarg, &end, 10);

			if (*end || v == 0 || v > 65536) {
				fprintf(stderr, "ckv-reprefill: --q-tokens %s: expected 1 .. 65536\n", optarg);
				return EXIT_USAGE;
			}
			ro.q_tokens = (uint32_t)v;
			break;
		}
		case 'N':
			ro.no_prefetch = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("ckv-reprefill %s\n", ckv_version());
			return 0;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (nmodes == 0) {
		modes[nmodes++] = CKV_MODE_FULL;
		modes[nmodes++] = CKV_MODE_LAYER;
	}
	printf("re-prefill of %s: %u new tokens' queries, %.1f ms of compute per layer, fresh loader per mode\n",
	       argv[optind + 1], ro.q_tokens, ro.compute_s * 1e3);
	printf("| %-6s | %-4s | %6s | %-19s | %10s | %10s | %5s | %9s | %9s | %-15s |\n", "mode", "dev",
	       "budget", "chunks used / all", "disk read", "needed", "amp", "total ms", "I/O wait", "spec used/waste");
	printf("|--------|------|--------|---------------------|------------|------------|-------|-----------|-----------|-----------------|\n");
	for (int i = 0; i < nmodes && rc == 0; i++)
		rc = run(argv[optind], argv[optind + 1], modes[i], &ro);
	return rc;
}
