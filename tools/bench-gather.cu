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
 * checked byte for byte once, then timed with events (median of -r runs;
 * gather against contiguous copy as the median of -r pairs' ratios, a copy
 * then a gather, so that a slower stretch of the link hits both sides).
 * -s also sweeps the kernel's shape (threads, loads in flight, grid) and
 * prints which was fastest. A second table moves the same sets in gathers
 * of -l copies each (one layer's chunk set, as the loader issues them),
 * back to back on one stream, with ordinary launches and with each gather
 * overlapping the end of the one before (programmatic dependent launch).
 * -x adds what bounds the gather: the same 8 and 64 KiB sets read from
 * other kinds of host memory (anonymous memory on transparent huge pages,
 * hugetlbfs pages when the system has them reserved; each the arena of a
 * backend of its own) and by other means (a TMA bulk-copy kernel; the copy
 * engines through cudaMemcpyBatchAsync), each beside a contiguous copy from
 * the same memory.
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
 * One event-timed run of fn: device seconds and host seconds spent in fn().
 * A 2 ms spin kernel ahead of it keeps the stream busy while the host
 * enqueues, so the events time the device work, not the host's preparation
 * (which a pipelined loader overlaps with earlier work; reported apart).
 */
template <typename Fn>
static std::pair<double, double> time_once(ckv_backend *b, cudaStream_t st, cudaEvent_t e0,
					   cudaEvent_t e1, Fn &fn)
{
	float ms;

	DIE_RC(b->ops->compute(b, 0.002, st));
	DIE_CU(cudaEventRecord(e0, st));
	double h0 = now_s();

	fn();
	double h = now_s() - h0;

	DIE_CU(cudaEventRecord(e1, st));
	DIE_CU(cudaEventSynchronize(e1));
	DIE_CU(cudaEventElapsedTime(&ms, e0, e1));
	return { ms * 1e-3, h };
}

static timing summary(std::vector<double> &t, std::vector<double> &h)
{
	std::sort(t.begin(), t.end());
	std::sort(h.begin(), h.end());
	return { t[t.size() / 2], t.front(), t.back(), h[h.size() / 2] };
}

/* Median of reps runs of fn (after two untimed warm-ups). */
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
		std::pair<double, double> r = time_once(b, st, e0, e1, fn);

		t.push_back(r.first);
		h.push_back(r.second);
	}
	DIE_CU(cudaEventDestroy(e0));
	DIE_CU(cudaEventDestroy(e1));
	return summary(t, h);
}

struct paired {
	timing a, b;
	double ratio; /* median over the pairs of time(a) / time(b) */
};

/*
 * reps pairs, a run of fa then a run of fb: a stretch of slower link (the
 * lent machines' PCIe is not always theirs alone) hits both sides of a
 * pair, and the ratio is the median of the pairs' ratios.
 */
template <typename Fa, typename Fb>
static paired time_pairs(ckv_backend *b, cudaStream_t st, int reps, Fa fa, Fb fb)
{
	cudaEvent_t e0, e1;
	std::vector<double> ta, ha, tb, hb, q;

	DIE_CU(cudaEventCreate(&e0));
	DIE_CU(cudaEventCreate(&e1));
	for (int i = 0; i < 2; i++) {
		fa();
		fb();
	}
	DIE_CU(cudaStreamSynchronize(st));
	for (int i = 0; i < reps; i++) {
		std::pair<double, double> x = time_once(b, st, e0, e1, fa);
		std::pair<double, double> y = time_once(b, st, e0, e1, fb);

		ta.push_back(x.first);
		ha.push_back(x.second);
		tb.push_back(y.first);
		hb.push_back(y.second);
		q.push_back(x.first / y.first);
	}
	DIE_CU(cudaEventDestroy(e0));
	DIE_CU(cudaEventDestroy(e1));
	std::sort(q.begin(), q.end());
	return { summary(ta, ha), summary(tb, hb), q[q.size() / 2] };
}

/* ---- -x: what bounds the gather ------------------------------------------ */

/*
 * The gather with the Hopper TMA unit instead of loads: one thread per block
 * moves its chunk
 * host -> shared memory (cp.async.bulk, completion on an mbarrier) ->
 * device memory (cp.async.bulk), 8 KiB pieces. sm_90 only.
 */
__global__ void x_tma_kernel(const unsigned char *base, const uint64_t *src, unsigned char *dst,
			     uint32_t cs)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	extern __shared__ __align__(128) unsigned char buf[];
	__shared__ __align__(8) uint64_t bar;
	const uint32_t sbuf = (uint32_t)__cvta_generic_to_shared(buf);
	const uint32_t sbar = (uint32_t)__cvta_generic_to_shared(&bar);
	const unsigned char *s = base + src[blockIdx.x];
	uint32_t done = 0;

	if (threadIdx.x != 0)
		return;
	asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sbar));
	asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
	asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sbar), "r"(cs)
		     : "memory");
	for (uint32_t o = 0; o < cs; o += 8192)
		asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
			     "[%0], [%1], %2, [%3];" ::"r"(sbuf + o),
			     "l"(s + o), "r"(cs - o < 8192 ? cs - o : 8192u), "r"(sbar)
			     : "memory");
	while (!done)
		asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], 0; "
			     "selp.u32 %0, 1, 0, q; }"
			     : "=r"(done)
			     : "r"(sbar)
			     : "memory");
	asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
			     dst + (uint64_t)blockIdx.x * cs),
		     "r"(sbuf), "r"(cs)
		     : "memory");
	asm volatile("cp.async.bulk.commit_group;" ::: "memory");
	asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}

struct x_source {
	const char *name;
	unsigned char *host; /* NULL: not available here (why) */
	char why[96];
	bool own;            /* mapped here */
	ckv_backend *be;     /* a backend with host as its arena */
};

/* Anonymous memory of bytes, hugetlb (MAP_HUGETLB) or THP (madvise), filled. */
static void x_map(x_source *x, uint64_t bytes, bool hugetlb)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | (hugetlb ? MAP_HUGETLB : 0), -1, 0);

	x->host = NULL;
	if (p == MAP_FAILED) {
		snprintf(x->why, sizeof(x->why), "%s (no huge pages reserved? vm.nr_hugepages)",
			 strerror(errno));
		return;
	}
	if (!hugetlb && madvise(p, bytes, MADV_HUGEPAGE)) {
		snprintf(x->why, sizeof(x->why), "madvise(MADV_HUGEPAGE): %s", strerror(errno));
		munmap(p, bytes);
		return;
	}
	fill_random((unsigned char *)p, bytes, 5);
	x->host = (unsigned char *)p;
	x->own = true;
}

/* The TMA gather of n chunks: a warp and cs bytes of shared memory each, 65,535 a launch. */
static void x_tma_launch(const unsigned char *dbase, const uint64_t *dsrc, unsigned char *dst,
			 uint64_t n, uint32_t cs, cudaStream_t st)
{
	for (uint64_t i = 0; i < n; i += 65535) {
		uint32_t k = (uint32_t)std::min<uint64_t>(65535, n - i);

		x_tma_kernel<<<k, 32, cs, st>>>(dbase, dsrc + i, dst + i * cs, cs);
	}
	DIE_CU(cudaGetLastError());
}

static void ceiling_table(ckv_backend *b, int device, cudaStream_t st, int reps,
			  const unsigned char *arena, uint64_t arena_bytes, uint64_t total,
			  unsigned char *dst, unsigned char *check, const std::vector<ckv_copy> &set8,
			  const std::vector<ckv_copy> &set64, int cc_major)
{
	static const uint32_t xs[] = { 8192, 65536 };
	x_source src[3] = { { "arena: memfd, 4 KiB pages, read-only", (unsigned char *)arena, "", false,
			      b },
			    { "anonymous, transparent huge pages", NULL, "", false, NULL },
			    { "anonymous, hugetlbfs 2 MiB pages", NULL, "", false, NULL } };
	uint64_t *dsrc;

	x_map(&src[1], arena_bytes, false);
	x_map(&src[2], arena_bytes, true);
	/* the backend's own gather on each: a backend a memory, that memory its arena */
	for (x_source &x : src) {
		if (!x.host || x.be)
			continue;
		DIE_RC(ckv_backend_cuda(device, &x.be));
		DIE_RC(x.be->ops->register_arena(x.be, x.host, arena_bytes, false));
	}
	DIE_CU(cudaMalloc(&dsrc, sizeof(uint64_t) * (total / 8192)));
	printf("\nwhat bounds the gather (-x): the same random chunk sets over %llu MiB of each kind "
	       "of host memory, GB/s and the ratio to a contiguous copy from that memory (median of "
	       "pairs, a copy then the other; the copy engines' column: ratio of medians; device "
	       "time, median of %d)\n| memory | chunk | contiguous copy | gather kernel | TMA "
	       "bulk-copy kernel | copy engines: cudaMemcpyBatchAsync (host time a copy) |\n"
	       "|---|---|---|---|---|---|\n",
	       (unsigned long long)(arena_bytes >> 20), reps);
	for (x_source &x : src) {
		unsigned char *dbase;

		if (!x.host) {
			printf("| %s | - | not available: %s | | | |\n", x.name, x.why);
			continue;
		}
		DIE_CU(cudaHostGetDevicePointer((void **)&dbase, x.host, 0));
		for (uint32_t cs : xs) {
			/* main's sets: the same chunks as the tables above, into the same places */
			const std::vector<ckv_copy> &c = cs == 8192 ? set8 : set64;
			const uint64_t n = c.size();
			std::vector<uint64_t> so(n);

			for (uint64_t i = 0; i < n; i++)
				so[i] = c[i].src;
			DIE_CU(cudaMemcpy(dsrc, so.data(), sizeof(uint64_t) * n, cudaMemcpyHostToDevice));

			auto contig_fn = [&] {
				DIE_CU(cudaMemcpyAsync(dst, x.host, total, cudaMemcpyHostToDevice, st));
			};
			auto checked = [&](const char *what) {
				DIE_CU(cudaStreamSynchronize(st));
				DIE_CU(cudaMemcpy(check, dst, total, cudaMemcpyDeviceToHost));
				for (uint64_t i = 0; i < n; i++)
					if (memcmp(check + i * cs, x.host + so[i], cs)) {
						fprintf(stderr, "bench-gather: -x %s: chunk %llu differs\n",
							what, (unsigned long long)i);
						exit(1);
					}
			};
			auto gather_fn = [&] {
				DIE_RC(x.be->ops->gather(x.be, c.data(), (uint32_t)n, cs, st));
			};
			DIE_CU(cudaMemsetAsync(dst, 0xa5, total, st));
			gather_fn();
			checked("gather kernel");
			paired g = time_pairs(b, st, reps, contig_fn, gather_fn);
			timing contig = g.a;

			printf("| %s | %u KiB | %.1f | %.1f (%.3f) |", x.name, cs >> 10,
			       total / contig.median / 1e9, total / g.b.median / 1e9, g.ratio);
			if (cc_major >= 9) {
				DIE_CU(cudaFuncSetAttribute(x_tma_kernel,
							    cudaFuncAttributeMaxDynamicSharedMemorySize,
							    (int)cs));
				DIE_CU(cudaMemsetAsync(dst, 0xa5, total, st));
				x_tma_launch(dbase, dsrc, dst, n, cs, st);
				checked("TMA kernel");
				paired t = time_pairs(b, st, reps, contig_fn, [&] {
					x_tma_launch(dbase, dsrc, dst, n, cs, st);
				});
				printf(" %.1f (%.3f) |", total / t.b.median / 1e9, t.ratio);
			} else {
				printf(" needs sm_90 |");
			}
#if CUDART_VERSION >= 12080
			{
				/* a slice: the driver prepares each copy on the host */
				const uint64_t nb = std::min<uint64_t>(n, 2048);
				std::vector<void *> dv(nb);
				std::vector<const void *> sv(nb);
				std::vector<size_t> lv(nb, cs);
				cudaMemcpyAttributes at = {};
				size_t ai = 0;

				at.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
				for (uint64_t i = 0; i < nb; i++) {
					dv[i] = dst + i * cs;
					sv[i] = x.host + so[i];
				}
				timing m = time_runs(b, st, std::min(reps, 5), [&] {
					DIE_CU(cudaMemcpyBatchAsync(dv.data(), sv.data(), lv.data(), nb, &at,
								    &ai, 1, st));
				});
				printf(" %.1f (%.3f; %.2f us) |\n", nb * cs / m.median / 1e9,
				       contig.median / (m.median * (double)n / nb), m.host / nb * 1e6);
			}
#else
			printf(" needs CUDA 12.8 |\n");
#endif
			fflush(stdout);
		}
	}
	for (x_source &x : src)
		if (x.own) {
			if (x.be)
				x.be->ops->destroy(x.be); /* unregisters its arena */
			munmap(x.host, arena_bytes);
		}
	DIE_CU(cudaFree(dsrc));
}

static void usage(FILE *f)
{
	fprintf(f, "usage: bench-gather [-a ARENA_MIB] [-t TOTAL_MIB] [-r REPS] [-d DEVICE] [-l COPIES]"
		   " [-s] [-x]\n"
		   "  -a  arena size (default 8192 MiB; a read-only memfd mapping)\n"
		   "  -t  bytes gathered per run (default 512 MiB)\n"
		   "  -r  timed runs per figure, median reported (default 15)\n"
		   "  -d  CUDA device (default 0)\n"
		   "  -l  copies per gather in the per-layer table (default 103: 10%% of 1,024 chunks)\n"
		   "  -s  also sweep the gather kernel's shape\n"
		   "  -x  also measure what bounds the gather: other host memory, TMA, copy engines\n"
		   "  -h  this help, -V version\n");
}

int main(int argc, char **argv)
{
	uint64_t arena_mib = 8192, total_mib = 512;
	int reps = 15, device = 0, opt, count = 0;
	uint32_t per_launch = 103;
	bool sweep = false, ceiling = false;

	while ((opt = getopt(argc, argv, "a:t:r:d:l:sxhV")) != -1) {
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
		case 'x':
			ceiling = true;
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
	       "kernel (min-max) | gather / contiguous (median of pairs) | host time of a gather call |\n"
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

		paired pg = time_pairs(
			b, st, reps,
			[&] { DIE_CU(cudaMemcpyAsync(dst, pinned, total, cudaMemcpyHostToDevice, st)); },
			[&] { DIE_RC(b->ops->gather(b, c.data(), (uint32_t)n, cs, st)); });
		timing contig = pg.a, gather = pg.b;
		timing per_chunk = time_runs(b, st, std::min(reps, 5), [&] {
			for (uint64_t i = 0; i < n; i++)
				DIE_CU(cudaMemcpyAsync(dst + i * cs, ro + c[i].src, cs,
						       cudaMemcpyHostToDevice, st));
		});
		snprintf(line[si], sizeof(line[si]),
			 "| %llu KiB | %llu | %.1f GB/s | %.1f GB/s | %.1f GB/s (%.1f-%.1f) | **%.2f** | "
			 "%.0f us |",
			 (unsigned long long)cs >> 10, (unsigned long long)n, total / contig.median / 1e9,
			 total / per_chunk.median / 1e9, total / gather.median / 1e9,
			 total / gather.max / 1e9, total / gather.min / 1e9, pg.ratio, gather.host * 1e6);
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
		       "persistent grid 4/SM | overlapped, an event recorded after each | overlapped, "
		       "each forked off the stream to one of 2 streams in turn (events), joined at the "
		       "end | the same, 4 streams | best / one contiguous copy |\n"
		       "|---|---|---|---|---|---|---|---|---|\n",
		       per_launch, reps, def.overlap ? "overlapped" : "ordinary");
		for (int si = 0; si < 3; si++) {
			std::vector<ckv_copy> &c = sets[si];
			uint64_t n = c.size(), launches = (n + per_launch - 1) / per_launch;
			double best = 0;

			printf("| %llu KiB | %llu |", (unsigned long long)sizes[si] >> 10,
			       (unsigned long long)launches);
			std::vector<cudaEvent_t> ev(launches), fork(launches);
			cudaStream_t side[4];

			for (cudaEvent_t &x : ev)
				DIE_CU(cudaEventCreateWithFlags(&x, cudaEventDisableTiming));
			for (cudaEvent_t &x : fork)
				DIE_CU(cudaEventCreateWithFlags(&x, cudaEventDisableTiming));
			for (cudaStream_t &x : side)
				DIE_CU(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
			for (int k = 0; k < 6; k++) {
				int nside = k == 4 ? 2 : k == 5 ? 4 : 0;

				cfg = def;
				cfg.overlap = k > 0;
				cfg.blocks_per_sm = k == 2 ? 4 : 0;
				DIE_RC(ckv_cuda_set_gather_cfg(b, &cfg));
				timing g = time_runs(b, st, reps, [&] {
					for (uint64_t i = 0, j = 0; i < n; i += per_launch, j++) {
						cudaStream_t gs = st;

						if (nside) { /* forked off st, joined back below */
							gs = side[j % nside];
							DIE_CU(cudaEventRecord(fork[j], st));
							DIE_CU(cudaStreamWaitEvent(gs, fork[j], 0));
						}
						DIE_RC(b->ops->gather(b, c.data() + i,
								      (uint32_t)std::min<uint64_t>(per_launch, n - i),
								      sizes[si], gs));
						if (k >= 3)
							DIE_CU(cudaEventRecord(ev[j], gs));
					}
					for (uint64_t j = 0; nside && j < launches; j++)
						DIE_CU(cudaStreamWaitEvent(st, ev[j], 0));
				});
				printf(" %.1f |", total / g.median / 1e9);
				best = std::max(best, total / g.median / 1e9);
			}
			printf(" %.2f |\n", best / (total / contig_s[si] / 1e9));
			fflush(stdout);
			for (cudaEvent_t x : ev)
				DIE_CU(cudaEventDestroy(x));
			for (cudaEvent_t x : fork)
				DIE_CU(cudaEventDestroy(x));
			for (cudaStream_t x : side)
				DIE_CU(cudaStreamDestroy(x));
		}
		DIE_RC(ckv_cuda_set_gather_cfg(b, &def));
	}

	if (ceiling)
		ceiling_table(b, device, st, reps, ro, arena_bytes, total, dst, check, sets[0], sets[2],
			      prop.major);
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
