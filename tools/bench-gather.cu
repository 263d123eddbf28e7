/*
 * bench-gather — how fast the CUDA backend's gather kernel moves a scattered
 * chunk set from a registered arena to device memory, against the same
 * bytes in one contiguous pinned cudaMemcpyAsync and in one
 * cudaMemcpyAsync per chunk (DESIGN §8: ratios measured side by side).
 *
 * The arena is what a loader gets from the daemon: a memfd of several GiB,
 * reopened O_RDONLY through /proc/self/fd, mapped PROT_READ and registered
 * with cudaHostRegisterReadOnly. For chunk sizes 8, 32 and 64 KiB a random
 * set of distinct chunks totalling -t MiB is gathered into device memory,
 * checked byte for byte once, then timed with events (median of -r runs).
 * -s also sweeps the kernel's shape (threads, loads in flight, grid) and
 * prints which was fastest. A second table moves the same sets in gathers
 * of -l copies each (one layer's chunk set, as the loader issues them),
 * back to back on one stream, with ordinary launches and with each gather
 * overlapping the end of the one before (programmatic dependent launch).
 *
 * Exit status: 0 ok, 1 failure (also: no CUDA device), 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include <cuda_runtime.h>

#include "backend.h"
#include "ckv_cuda.h"
#include "ckv_format.h"

/* CUDA under ASan needs the shadow gap unprotected (the driver maps there). */
extern "C" const char *__asan_default_options(void);
extern "C" const char *__asan_default_options(void)
{
	return "protect_shadow_gap=0";
}

#define DIE_CU(call)                                                                       \
	do {                                                                               \
		cudaError_t e_ = (call);                                                   \
		if (e_ != cudaSuccess) {                                                   \
			fprintf(stderr, "bench-gather: %s: %s\n", #call, cudaGetErrorString(e_)); \
			exit(1);                                                           \
		}                                                                          \
	} while (0)

#define DIE_RC(call)                                                                       \
	do {                                                                               \
		int rc_ = (call);                                                          \
		if (rc_) {                                                                 \
			fprintf(stderr, "bench-gather: %s: %s\n", #call, strerror(-rc_));        \
			exit(1);                                                           \
		}                                                                          \
	} while (0)

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

struct fill_job {
	unsigned char *p;
	size_t n;
	uint64_t seed;
};

static void *fill_thread(void *arg)
{
	struct fill_job *j = (struct fill_job *)arg;

	for (size_t i = 0; i + 8 <= j->n; i += 8) {
		uint64_t v = splitmix(&j->seed);

		memcpy(j->p + i, &v, 8);
	}
	return NULL;
}

/* Random bytes (never zeros: they can hide unwritten memory), on every core. */
static void fill_random(unsigned char *p, size_t n, uint64_t seed)
{
	long nt = sysconf(_SC_NPROCESSORS_ONLN);

	if (nt < 1)
		nt = 1;
	if (nt > 64)
		nt = 64;
	std::vector<pthread_t> th(nt);
	std::vector<fill_job> jobs(nt);
	size_t per = (n / nt + 4095) & ~(size_t)4095;

	for (long i = 0; i < nt; i++) {
		size_t off = std::min(n, per * i);

		jobs[i] = { p + off, std::min(per, n - off), seed + (uint64_t)i * 0x1234567ull };
		if (pthread_create(&th[i], NULL, fill_thread, &jobs[i])) {
			fprintf(stderr, "bench-gather: pthread_create failed\n");
			exit(1);
		}
	}
	for (long i = 0; i < nt; i++)
		pthread_join(th[i], NULL);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct timing {
	double median, min, max; /* device seconds */
	double host;             /* median host seconds spent in fn() */
};

/*
 * Median of reps event-timed runs of fn (after two untimed warm-ups). A
 * 2 ms spin kernel ahead of each run keeps the stream busy while the host
 * enqueues, so the events time the device work, not the host's preparation
 * (which a pipelined loader overlaps with earlier work; reported apart).
 */
template <typename Fn>
static timing time_runs(ckv_backend *b, cudaStream_t st, int reps, Fn fn)
{
	cudaEvent_t e0, e1;
	std::vector<double> t, h;

	DIE_CU(cudaEventCreate(&e0));
	DIE_CU(cudaEventCreate(&e1));
	for (int i = 0; i < 2; i++)
		fn();
	DIE_CU(cudaStreamSynchronize(st));
	for (int i = 0; i < reps; i++) {
		float ms;

		DIE_RC(b->ops->compute(b, 0.002, st));
		DIE_CU(cudaEventRecord(e0, st));
		double h0 = now_s();

		fn();
		h.push_back(now_s() - h0);
		DIE_CU(cudaEventRecord(e1, st));
		DIE_CU(cudaEventSynchronize(e1));
		DIE_CU(cudaEventElapsedTime(&ms, e0, e1));
		t.push_back(ms * 1e-3);
	}
	DIE_CU(cudaEventDestroy(e0));
	DIE_CU(cudaEventDestroy(e1));
	std::sort(t.begin(), t.end());
	std::sort(h.begin(), h.end());
	return { t[t.size() / 2], t.front(), t.back(), h[h.size() / 2] };
}

static void usage(FILE *f)
{
	fprintf(f, "usage: bench-gather [-a ARENA_MIB] [-t TOTAL_MIB] [-r REPS] [-d DEVICE] [-l COPIES] [-s]\n"
		   "  -a  arena size (default 8192 MiB; a read-only memfd mapping)\n"
		   "  -t  bytes gathered per run (default 512 MiB)\n"
		   "  -r  timed runs per figure, median reported (default 15)\n"
		   "  -d  CUDA device (default 0)\n"
		   "  -l  copies per gather in the per-layer table (default 103: 10%% of 1,024 chunks)\n"
		   "  -s  also sweep the gather kernel's shape\n"
		   "  -h  this help, -V version\n");
}

int main(int argc, char **argv)
{
	uint64_t arena_mib = 8192, total_mib = 512;
	int reps = 15, device = 0, opt, count = 0;
	uint32_t per_launch = 103;
	bool sweep = false;

	while ((opt = getopt(argc, argv, "a:t:r:d:l:shV")) != -1) {
		switch (opt) {
		case 'a':
			arena_mib = strtoull(optarg, NULL, 10);
			break;
		case 't':
			total_mib = strtoull(optarg, NULL, 10);
			break;
		case 'r':
			reps = atoi(optarg);
			break;
		case 'd':
			device = atoi(optarg);
			break;
		case 'l':
			per_launch = (uint32_t)strtoul(optarg, NULL, 10);
			break;
		case 's':
			sweep = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("bench-gather %d.%d.%d\n", CKV_VERSION_MAJOR, CKV_VERSION_MINOR,
			       CKV_VERSION_PATCH);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc || reps < 1 || total_mib < 1 || arena_mib < 2 * total_mib || per_launch < 1) {
		usage(stderr);
		return 2;
	}
	if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
		fprintf(stderr, "bench-gather: no CUDA device\n");
		return 1;
	}

	const uint64_t arena_bytes = arena_mib << 20, total = total_mib << 20;
	cudaDeviceProp prop;

	DIE_CU(cudaSetDevice(device));
	DIE_CU(cudaGetDeviceProperties(&prop, device));

	/* the arena, as a loader receives the daemon's */
	int fd = memfd_create("ckv-bench-arena", MFD_CLOEXEC);
	char path[64];

	if (fd < 0 || ftruncate(fd, (off_t)arena_bytes)) {
		perror("bench-gather: arena memfd");
		return 1;
	}
	unsigned char *rw = (unsigned char *)mmap(NULL, arena_bytes, PROT_READ | PROT_WRITE,
						  MAP_SHARED, fd, 0);
	if (rw == MAP_FAILED) {
		perror("bench-gather: mmap arena");
		return 1;
	}
	double t0 = now_s();

	fill_random(rw, arena_bytes, 1);
	double fill_s = now_s() - t0;

	munmap(rw, arena_bytes);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	int rfd = open(path, O_RDONLY | O_CLOEXEC);
	const unsigned char *ro =
		rfd < 0 ? (const unsigned char *)MAP_FAILED
			: (const unsigned char *)mmap(NULL, arena_bytes, PROT_READ, MAP_SHARED, rfd, 0);

	if (ro == MAP_FAILED) {
		perror("bench-gather: read-only arena mapping");
		return 1;
	}

	ckv_backend *b;

	DIE_RC(ckv_backend_cuda(device, &b));
	t0 = now_s();
	DIE_RC(b->ops->register_arena(b, (void *)ro, arena_bytes, true));
	double reg_s = now_s() - t0;

	unsigned char *dst, *pinned, *check = (unsigned char *)malloc(total);
	cudaStream_t st;

	DIE_RC(b->ops->alloc(b, total, (void **)&dst));
	DIE_CU(cudaMallocHost((void **)&pinned, total));
	fill_random(pinned, total, 2);
	DIE_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
	if (!check) {
		fprintf(stderr, "bench-gather: out of memory\n");
		return 1;
	}

	char date[32];
	time_t now = time(NULL);

	strftime(date, sizeof(date), "%Y-%m-%d", gmtime(&now));
	printf("bench-gather: %s (%d SMs), %s\n", prop.name, prop.multiProcessorCount, date);
	printf("arena: %llu MiB memfd, O_RDONLY reopen mapped PROT_READ, cudaHostRegisterReadOnly "
	       "(fill %.1f s, register %.2f s); %llu MiB of random distinct chunks per run; "
	       "device time (events), median of %d runs\n\n",
	       (unsigned long long)arena_mib, fill_s, reg_s, (unsigned long long)total_mib, reps);

	static const uint64_t sizes[] = { 8192, 32768, 65536 };
	std::vector<std::vector<ckv_copy>> sets(3);
	uint64_t seed = 3;
	char line[4][256];
	double contig_s[3];

	printf("| chunk | chunks | one contiguous pinned copy | per-chunk cudaMemcpyAsync | gather "
	       "kernel (min-max) | gather / contiguous | host time of a gather call |\n"
	       "|---|---|---|---|---|---|---|\n");
	for (int si = 0; si < 3; si++) {
		const uint64_t cs = sizes[si], n = total / cs, slots = arena_bytes / cs;
		std::vector<uint32_t> perm(slots);
		std::vector<ckv_copy> &c = sets[si];

		for (uint64_t i = 0; i < slots; i++)
			perm[i] = (uint32_t)i;
		for (uint64_t i = 0; i < n; i++) /* partial Fisher-Yates: n distinct slots */
			std::swap(perm[i], perm[i + splitmix(&seed) % (slots - i)]);
		c.resize(n);
		for (uint64_t i = 0; i < n; i++)
			c[i] = { (uint64_t)perm[i] * cs, dst + i * cs };

		/* correctness once: poisoned destination, every byte compared */
		DIE_CU(cudaMemsetAsync(dst, 0xa5, total, st));
		DIE_RC(b->ops->gather(b, c.data(), (uint32_t)n, cs, st));
		DIE_CU(cudaStreamSynchronize(st));
		DIE_CU(cudaMemcpy(check, dst, total, cudaMemcpyDeviceToHost));
		for (uint64_t i = 0; i < n; i++) {
			if (memcmp(check + i * cs, ro + c[i].src, cs)) {
				fprintf(stderr, "bench-gather: %llu KiB chunk %llu differs\n",
					(unsigned long long)cs >> 10, (unsigned long long)i);
				return 1;
			}
		}

		timing contig = time_runs(b, st, reps, [&] {
			DIE_CU(cudaMemcpyAsync(dst, pinned, total, cudaMemcpyHostToDevice, st));
		});
		timing per_chunk = time_runs(b, st, std::min(reps, 5), [&] {
			for (uint64_t i = 0; i < n; i++)
				DIE_CU(cudaMemcpyAsync(dst + i * cs, ro + c[i].src, cs,
						       cudaMemcpyHostToDevice, st));
		});
		timing gather = time_runs(b, st, reps, [&] {
			DIE_RC(b->ops->gather(b, c.data(), (uint32_t)n, cs, st));
		});
		snprintf(line[si], sizeof(line[si]),
			 "| %llu KiB | %llu | %.1f GB/s | %.1f GB/s | %.1f GB/s (%.1f-%.1f) | **%.2f** | "
			 "%.0f us |",
			 (unsigned long long)cs >> 10, (unsigned long long)n, total / contig.median / 1e9,
			 total / per_chunk.median / 1e9, total / gather.median / 1e9,
			 total / gather.max / 1e9, total / gather.min / 1e9,
			 contig.median / gather.median, gather.host * 1e6);
		printf("%s\n", line[si]);
		fflush(stdout);
		contig_s[si] = contig.median;
	}

	/* one layer's set per gather, back to back: what the loader issues */
	{
		ckv_cuda_gather_cfg def, cfg;

		ckv_cuda_get_gather_cfg(b, &def);
		printf("\ngathers of %u copies each, back to back on one stream (GB/s, median of %d; "
		       "overlapped: each gather may start while the previous one ends; the default "
		       "is %s)\n| chunk | gathers | ordinary launches | overlapped | overlapped, "
		       "persistent grid 4/SM | overlapped, an event recorded after each | best / one "
		       "contiguous copy |\n|---|---|---|---|---|---|---|\n",
		       per_launch, reps, def.overlap ? "overlapped" : "ordinary");
		for (int si = 0; si < 3; si++) {
			std::vector<ckv_copy> &c = sets[si];
			uint64_t n = c.size(), launches = (n + per_launch - 1) / per_launch;
			double best = 0;

			printf("| %llu KiB | %llu |", (unsigned long long)sizes[si] >> 10,
			       (unsigned long long)launches);
			std::vector<cudaEvent_t> ev(launches);

			for (cudaEvent_t &x : ev)
				DIE_CU(cudaEventCreateWithFlags(&x, cudaEventDisableTiming));
			for (int k = 0; k < 4; k++) {
				cfg = def;
				cfg.overlap = k > 0;
				cfg.blocks_per_sm = k == 2 ? 4 : 0;
				DIE_RC(ckv_cuda_set_gather_cfg(b, &cfg));
				timing g = time_runs(b, st, reps, [&] {
					for (uint64_t i = 0, j = 0; i < n; i += per_launch, j++) {
						DIE_RC(b->ops->gather(b, c.data() + i,
								      (uint32_t)std::min<uint64_t>(per_launch, n - i),
								      sizes[si], st));
						if (k == 3)
							DIE_CU(cudaEventRecord(ev[j], st));
					}
				});
				printf(" %.1f |", total / g.median / 1e9);
				best = std::max(best, total / g.median / 1e9);
			}
			printf(" %.2f |\n", best / (total / contig_s[si] / 1e9));
			fflush(stdout);
			for (cudaEvent_t x : ev)
				DIE_CU(cudaEventDestroy(x));
		}
		DIE_RC(ckv_cuda_set_gather_cfg(b, &def));
	}

	if (sweep) {
		static const uint32_t threads[] = { 128, 256, 512 }, unroll[] = { 2, 4, 8 },
				      bps[] = { 0, 4, 8, 16 };
		ckv_cuda_gather_cfg def, cfg, best[3];
		double best_gbs[3] = { 0, 0, 0 };

		ckv_cuda_get_gather_cfg(b, &def);
		printf("\nkernel shape sweep (gather GB/s, median of %d; grid 0 = one block per chunk, "
		       "k = k blocks per SM)\n| threads | loads/thread | grid | 8 KiB | 32 KiB | 64 KiB |\n"
		       "|---|---|---|---|---|---|\n",
		       std::max(reps / 2, 3));
		for (uint32_t ti : threads)
			for (uint32_t ui : unroll)
				for (uint32_t bi : bps) {
					cfg = def;
					cfg.threads = ti;
					cfg.unroll = ui;
					cfg.blocks_per_sm = bi;
					DIE_RC(ckv_cuda_set_gather_cfg(b, &cfg));
					printf("| %u | %u | %u |", ti, ui, bi);
					for (int si = 0; si < 3; si++) {
						std::vector<ckv_copy> &c = sets[si];
						timing g = time_runs(b, st, std::max(reps / 2, 3), [&] {
							DIE_RC(b->ops->gather(b, c.data(),
									      (uint32_t)c.size(),
									      sizes[si], st));
						});
						double gbs = total / g.median / 1e9;

						printf(" %.1f |", gbs);
						if (gbs > best_gbs[si]) {
							best_gbs[si] = gbs;
							best[si] = cfg;
						}
					}
					printf("\n");
					fflush(stdout);
				}
		DIE_RC(ckv_cuda_set_gather_cfg(b, &def));
		/* does the order of the copies matter? the same sets in arena order */
		printf("\ndefault shape, copies sorted by arena offset:");
		for (int si = 0; si < 3; si++) {
			std::vector<ckv_copy> c = sets[si];

			std::sort(c.begin(), c.end(), [](const ckv_copy &x, const ckv_copy &y) {
				return x.src < y.src;
			});
			timing g = time_runs(b, st, reps, [&] {
				DIE_RC(b->ops->gather(b, c.data(), (uint32_t)c.size(), sizes[si], st));
			});
			printf(" %llu KiB %.1f GB/s;", (unsigned long long)sizes[si] >> 10,
			       total / g.median / 1e9);
		}
		printf("\n");
		for (int si = 0; si < 3; si++)
			printf("best for %llu KiB: threads %u, loads/thread %u, grid %u: %.1f GB/s\n",
			       (unsigned long long)sizes[si] >> 10, best[si].threads, best[si].unroll,
			       best[si].blocks_per_sm, best_gbs[si]);
		printf("default: threads %u, loads/thread %u, grid %u\n", def.threads, def.unroll,
		       def.blocks_per_sm);
		/* the headline table again last, so it ends the output */
		printf("\n");
		for (int si = 0; si < 3; si++)
			printf("%s\n", line[si]);
	}

	DIE_CU(cudaStreamDestroy(st));
	DIE_CU(cudaFreeHost(pinned));
	b->ops->free(b, dst);
	b->ops->destroy(b);
	munmap((void *)ro, arena_bytes);
	close(rfd);
	close(fd);
	free(check);
	return 0;
}
