/*
 * backend_cuda.cu — the CUDA backend of libckvgpu (backend.h) and the
 * engine-facing kernels of ckv_cuda.h.
 *
 * Gather design (MEASUREMENTS.md): a chunk set is thousands of 8-64 KiB
 * pieces scattered over a multi-GiB arena. One cudaMemcpyAsync per chunk
 * pays a launch each (2.6 GB/s at 8 KiB against 55 GB/s for one contiguous
 * copy), so the arena is registered once as mapped host memory and a
 * gather is ONE kernel launch whose blocks read their chunks straight over
 * PCIe and write them to arbitrary device destinations. Reads from host
 * memory have microseconds of latency, so the link is filled only with
 * many bytes in flight: 16-byte loads (the widest a thread can issue),
 * several per thread issued before the first is used, many blocks
 * resident per SM. On an H200 it moves 51.2 GB/s at 8, 32 and 64 KiB
 * chunks, 0.92-0.93 of one contiguous pinned copy (docs/BENCHMARKS.md);
 * thread count, loads in flight and grid shape made no difference beyond
 * noise there. Gathers of one layer's set back to back, as the loader
 * issues them, came out 0.5-1% faster with 512 threads than with 256 at 8
 * and 32 KiB in every side-by-side run (less than the spread between
 * machine starts; every load of a 32 KiB chunk goes out before the wait
 * for the previous kernel; BENCHMARKS.md), so: 512 threads, 4 loads, one
 * block per chunk.
 *
 * The copy descriptors (16 bytes each) reach the device as kernel
 * parameters, in the smallest of three parameter blocks that holds them
 * (2, 8 or 32 KiB: up to 2044 copies with CUDA 12.1+, 128 before), else
 * through a ring: a pinned host
 * staging buffer and a device buffer of the same size, filled with
 * cudaMemcpyAsync on the gather's own stream just before the launch. A
 * ring reservation lives until its kernel has run; a CUDA event recorded
 * after the kernel marks that point, and space is reused only once the
 * events of the reservations in it have completed. That is what lets a
 * caller enqueue many gathers on one or several streams and reuse its own
 * descriptor array at once, with no synchronisation of its own.
 *
 * Completion: after() records an event that the reaper thread polls;
 * gather_then() instead hands the gather kernel a word in pinned host
 * memory that its last block sets, so nothing is enqueued between two
 * gathers and the reaper reads memory instead of calling the driver.
 *
 * Errors: every CUDA call goes through cu_rc(), the one adapter from
 * cudaError_t to a negative errno (-ENOMEM, -ENODEV, else -EIO); it logs
 * the call and cudaGetErrorString to stderr.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include <cuda_runtime.h>

#include "backend.h"
#include "ckv_cuda.h"

/* ---- error adapter ------------------------------------------------------ */

static int cu_fail(cudaError_t e, const char *what)
{
	fprintf(stderr, "ckvgpu: cuda: %s: %s (%s)\n", what, cudaGetErrorString(e),
		cudaGetErrorName(e));
	/*
	 * Consume the error the runtime also recorded as the thread's last
	 * error: an engine that checks cudaGetLastError() after its own
	 * launches (PyTorch does) must not see ours. Sticky errors stay.
	 */
	(void)cudaGetLastError();
	switch (e) {
	case cudaErrorMemoryAllocation:
		return -ENOMEM;
	case cudaErrorNoDevice:
	case cudaErrorInsufficientDriver:
	case cudaErrorInvalidDevice:
	case cudaErrorDevicesUnavailable:
	case cudaErrorCompatNotSupportedOnDevice:
	case cudaErrorNoKernelImageForDevice:
		return -ENODEV;
	default:
		return -EIO;
	}
}

static inline int cu_rc(cudaError_t e, const char *what)
{
	return e == cudaSuccess ? 0 : cu_fail(e, what);
}

#define CU(call) cu_rc((call), #call)

/*
 * Kernels are launched with cudaLaunchKernelEx, whose return value is the
 * launch's own error, never through <<<>>> + cudaGetLastError(), which
 * would also report (and clear) an error left by the engine's code.
 */
static cudaLaunchConfig_t launch_cfg(dim3 grid, dim3 block, cudaStream_t s)
{
	cudaLaunchConfig_t lc = {};

	lc.gridDim = grid;
	lc.blockDim = block;
	lc.stream = s;
	return lc;
}

/* ---- the backend -------------------------------------------------------- */

enum {
	/*
	 * Copies passed as kernel parameters, in three sizes of parameter
	 * block (2, 8 and 32 KiB: a launch copies the whole block, so a small
	 * gather takes a small one). Past 4 KiB of parameters needs CUDA 12.1
	 * in the toolkit that builds the kernels (CKV_BIG_PARAMS) and in the
	 * driver that runs them; without either, gathers of more than
	 * GATHER_INLINE copies go through the ring.
	 */
	GATHER_INLINE = 128,
	GATHER_INLINE_MID = 508,
	GATHER_INLINE_MAX = 2044,
	SCATTER_INLINE = 256,  /* source offsets passed as kernel parameters (2 KiB) */
	RING_RECS = 1024,      /* reservations in flight at most */
	FLAG_SLOTS = 256,      /* completion words (gather_then records) */
	RING_ALIGN = 256,
	MAX_CHUNK_TOKENS = 4096,
};
#define RING_DEFAULT (1u << 20) /* 64 Ki descriptors */
#define MAX_COPY_LEN (1ull << 30)

/* One ring reservation: its end position and the event after its kernel. */
struct ring_rec {
	uint64_t end;
	cudaEvent_t ev; /* created on first use of the slot, reused after */
};

struct cuda_backend {
	ckv_backend base; /* first: a ckv_backend * is a struct cuda_backend * */
	int device;
	int sms;
	bool ro_register; /* cudaDevAttrHostRegisterReadOnlySupported */
	bool pdl;         /* programmatic dependent launch (compute capability 9.0+) */
	uint32_t inline_limit; /* most copies the driver takes in kernel parameters */

	/* set by register_arena before any gather, read-only afterwards */
	void *arena_host;
	uint64_t arena_size;
	const char *arena_dev; /* the arena as the device addresses it */

	/*
	 * Lock order: lock is the only lock. Held across reserve, staging,
	 * enqueue and event record so reservations are recorded in ring order.
	 */
	pthread_mutex_t lock;
	ckv_cuda_gather_cfg cfg;  /* protected by lock (copied out per launch) */
	unsigned char *ring_host; /* pinned staging, protected by lock */
	unsigned char *ring_dev;  /* protected by lock */
	uint64_t ring_size;       /* protected by lock */
	/*
	 * Positions grow without wrapping; byte p lives at p % ring_size. Live
	 * reservations lie in [tail, head), so head - tail <= ring_size.
	 */
	uint64_t head, tail;             /* protected by lock */
	struct ring_rec recs[RING_RECS]; /* FIFO, protected by lock */
	uint32_t rec_first, rec_count;   /* protected by lock */

	/*
	 * after(): an event recorded on the caller's stream and a reaper
	 * thread that waits for it and runs the callback. cudaLaunchHostFunc
	 * would hold the stream until the host had run the callback (a GPU ->
	 * host -> GPU round trip per fetch: a warm fetch of a few MiB ran at
	 * 0.4 of a contiguous copy); with an event the stream runs on. A
	 * thread in sync() runs the callbacks of finished work itself instead
	 * of waiting for the reaper to wake up (two thread wake-ups at the end
	 * of every sync otherwise).
	 * Lock order: rlock is taken alone, never with lock.
	 */
	pthread_mutex_t rlock;
	pthread_cond_t rcond;           /* rlock: work queued, work done, stop */
	struct after_rec *rq_head, *rq_tail; /* rlock: FIFO of pending callbacks */
	struct after_rec *rfree;        /* rlock: spare records with their events */
	struct after_rec *rq_watch;     /* rlock: the record whose event the reaper waits on */
	uint64_t rq_seq;                /* rlock: callbacks queued */
	uint32_t rq_running;            /* rlock: callbacks taken off the queue, not yet returned */
	bool reaper_running, reaper_stop; /* rlock */
	pthread_t reaper;
	/*
	 * Completion words, one per record that has one: the gather kernel's
	 * last block to finish sets flag_host[i] (pinned, mapped; the kernel
	 * writes it through flag_dev), counting its blocks in cnt_dev[i]. The
	 * host polls memory: no driver call, no event between two gathers.
	 */
	uint32_t *flag_host, *flag_dev, *cnt_dev; /* allocated once, under rlock */
	int nflags;                               /* rlock: words handed to records */
	bool flags_failed;                        /* rlock: allocation failed; events only */
};

/*
 * A callback to run once the stream has passed a point: marked by an event
 * (after), or by the completion word the gather kernel before it sets
 * (gather_then: no stream operation between two gathers).
 */
struct after_rec {
	struct after_rec *next;
	cudaEvent_t ev;
	int fslot;      /* this record's completion word, or -1 (events only) */
	uint32_t fblocks; /* blocks counted in cnt_dev[fslot] so far (wraps) */
	bool flagged;   /* this use waits for the word, not the event */
	cudaStream_t stream;
	void (*fn)(void *arg);
	void *arg;
	uint64_t seq;
	bool taken; /* run by a syncing thread while the reaper waited on it */
};

static struct cuda_backend *cb_of(ckv_backend *b)
{
	return (struct cuda_backend *)b;
}

/*
 * Make the backend's device current for this thread and put the caller's
 * back afterwards: an engine calling us from its own thread keeps its
 * device.
 */
struct dev_scope {
	int prev = -1;
	~dev_scope()
	{
		if (prev >= 0)
			cudaSetDevice(prev);
	}
	int enter(int device)
	{
		int cur;
		int rc = CU(cudaGetDevice(&cur));

		if (rc)
			return rc;
		if (cur == device)
			return 0;
		rc = CU(cudaSetDevice(device));
		if (rc == 0)
			prev = cur;
		return rc;
	}
};

/* ---- descriptor ring ---------------------------------------------------- */

/* Retire the oldest reservation; wait for its event when `wait`. 1: retired, 0: not yet. */
static int ring_retire_one(struct cuda_backend *cb, bool wait)
{
	struct ring_rec *r = &cb->recs[cb->rec_first];
	cudaError_t e = wait ? cudaEventSynchronize(r->ev) : cudaEventQuery(r->ev);

	if (e == cudaErrorNotReady)
		return 0;
	if (e != cudaSuccess)
		return cu_fail(e, wait ? "cudaEventSynchronize(ring)" : "cudaEventQuery(ring)");
	cb->tail = r->end;
	cb->rec_first = (cb->rec_first + 1) % RING_RECS;
	cb->rec_count--;
	return 1;
}

static int ring_drain(struct cuda_backend *cb)
{
	while (cb->rec_count) {
		int rc = ring_retire_one(cb, true);

		if (rc < 0)
			return rc;
	}
	cb->tail = cb->head;
	return 0;
}

static void ring_free(struct cuda_backend *cb)
{
	if (cb->ring_host)
		cu_rc(cudaFreeHost(cb->ring_host), "cudaFreeHost(ring)");
	if (cb->ring_dev)
		cu_rc(cudaFree(cb->ring_dev), "cudaFree(ring)");
	cb->ring_host = NULL;
	cb->ring_dev = NULL;
	cb->ring_size = 0;
}

/* Replace the ring by one of `size` bytes once nothing uses the old one. */
static int ring_resize(struct cuda_backend *cb, uint64_t size)
{
	int rc = ring_drain(cb);

	if (rc)
		return rc;
	ring_free(cb);
	rc = CU(cudaHostAlloc((void **)&cb->ring_host, size, cudaHostAllocDefault));
	if (rc)
		return rc;
	rc = CU(cudaMalloc((void **)&cb->ring_dev, size));
	if (rc) {
		ring_free(cb);
		return rc;
	}
	cb->ring_size = size;
	cb->head = cb->tail = 0;
	return 0;
}

/*
 * Reserve `bytes` (contiguous, a multiple of RING_ALIGN) for descriptors. Waits,
 * with the lock held, for the oldest reservations' kernels when the ring is
 * full. Returns the position; the caller stages at p % ring_size and calls
 * ring_commit after its launch. Caller holds cb->lock.
 */
static int ring_reserve(struct cuda_backend *cb, uint64_t bytes, uint64_t *pos)
{
	int rc;

	if (bytes > cb->ring_size) {
		uint64_t size = cb->ring_size ? cb->ring_size : RING_DEFAULT;

		while (size < bytes)
			size *= 2;
		rc = ring_resize(cb, size);
		if (rc)
			return rc;
	}
	for (;;) {
		uint64_t p = cb->head, r = cb->ring_size;

		if (p % r + bytes > r)
			p += r - p % r; /* no room before the end: start of the next lap */
		if (p + bytes - cb->tail <= r && cb->rec_count < RING_RECS) {
			*pos = p;
			return 0;
		}
		if (cb->rec_count == 0) {
			cb->head = cb->tail = p; /* nothing in flight: restart at p */
			continue;
		}
		/* Full: take what has finished, else wait for the oldest. */
		rc = ring_retire_one(cb, false);
		if (rc == 0)
			rc = ring_retire_one(cb, true);
		if (rc < 0)
			return rc;
	}
}

/*
 * The kernel that reads [pos, end) is enqueued on stream: record the event
 * that frees it. If the record fails, the stream is waited for instead so
 * the space can still be reused safely. Caller holds cb->lock.
 */
static int ring_commit(struct cuda_backend *cb, uint64_t end, cudaStream_t stream)
{
	struct ring_rec *r = &cb->recs[(cb->rec_first + cb->rec_count) % RING_RECS];
	int rc = 0;

	cb->head = end;
	if (!r->ev)
		rc = CU(cudaEventCreateWithFlags(&r->ev, cudaEventDisableTiming));
	if (rc == 0)
		rc = CU(cudaEventRecord(r->ev, stream));
	if (rc) {
		cu_rc(cudaStreamSynchronize(stream), "cudaStreamSynchronize(ring fallback)");
		return rc;
	}
	r->end = end;
	cb->rec_count++;
	return 0;
}

/*
 * Stage `bytes` of descriptors through the ring — fill(host slot) writes
 * them — and call launch(device copy of them), all on `stream` and under
 * the lock.
 */
template <typename Fill, typename Launch>
static int ring_launch(struct cuda_backend *cb, uint64_t bytes, cudaStream_t stream, Fill fill,
		       Launch launch)
{
	uint64_t span = (bytes + RING_ALIGN - 1) & ~(uint64_t)(RING_ALIGN - 1), pos;
	int rc;

	pthread_mutex_lock(&cb->lock);
	rc = ring_reserve(cb, span, &pos);
	if (rc)
		goto out_unlock;
	{
		uint64_t off = pos % cb->ring_size;

		fill(cb->ring_host + off);
		rc = CU(cudaMemcpyAsync(cb->ring_dev + off, cb->ring_host + off, bytes,
					cudaMemcpyHostToDevice, stream));
		if (rc)
			goto out_unlock; /* nothing reads the slot's device side; head stays */
		rc = launch(cb->ring_dev + off);
		if (rc) {
			/* the copy may still read the staging bytes: keep them reserved */
			int rc2 = ring_commit(cb, pos + span, stream);

			(void)rc2;
			goto out_unlock;
		}
		rc = ring_commit(cb, pos + span, stream);
	}
out_unlock:
	pthread_mutex_unlock(&cb->lock);
	return rc;
}

/* ---- gather ------------------------------------------------------------- */

struct gather_head {
	uint64_t base;         /* copy i reads base + src: the arena's device view, or 0 */
	const ckv_copy *descs; /* in the ring, or NULL: the parameters' inl[] */
	uint32_t *done_cnt;    /* with done_flag: blocks finished, over every use of the word */
	uint32_t *done_flag;   /* set to 1 by the block that brings done_cnt to done_at, or NULL */
	uint32_t done_at;
	uint32_t n;
	uint32_t nvec; /* 16-byte vectors per copy */
};

template <int CAP> struct gather_params {
	gather_head h;
	ckv_copy inl[CAP];
};
static_assert(sizeof(gather_params<GATHER_INLINE>) <= 4096, "fits the 4 KiB of parameters");
#if CUDART_VERSION >= 12010
#define CKV_BIG_PARAMS 1 /* this toolkit builds kernels with up to 32 KiB of parameters */
static_assert(sizeof(gather_params<GATHER_INLINE_MAX>) <= 32764, "fits CUDA 12.1's 32 KiB");
#else
#define CKV_BIG_PARAMS 0
#endif

/*
 * Programmatic dependent launch (sm_90+): trigger lets the next kernel of
 * the stream, if launched to allow it, start before this one ends; wait
 * blocks until the previous kernel has finished and its writes are
 * visible. Both are no-ops for kernels launched without the attribute.
 */
__device__ __forceinline__ void pdl_trigger(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/*
 * Blocks take copies i = blockIdx.x, + gridDim.x, ...; threads of a block
 * move consecutive 16-byte vectors (coalesced 512-byte warp requests on
 * both sides). Each thread issues U loads before it stores any: the loads
 * come from host memory, and independent loads in flight are what hides
 * the PCIe round trip. ld.global.nc: the chunks do not change while their
 * gather runs (the loader pins them), and the read-only path keeps the
 * loads out of L1. Launched overlapped (launch_gather), a thread's first
 * loads go out before it waits for the previous kernel, its stores after.
 */
template <int U, int CAP>
__global__ void gather_kernel(const __grid_constant__ gather_params<CAP> p)
{
	const gather_head &h = p.h;
	const uint32_t step = blockDim.x;
	bool waited = false;

	pdl_trigger(); /* the next gather on the stream may start while this one runs */
	for (uint32_t i = blockIdx.x; i < h.n; i += gridDim.x) {
		const ckv_copy c = h.descs ? h.descs[i] : p.inl[i];
		const uint4 *src = reinterpret_cast<const uint4 *>(h.base + c.src);
		uint4 *dst = static_cast<uint4 *>(c.dst);

		for (uint32_t v = threadIdx.x; v < h.nvec; v += U * step) {
			uint4 r[U];

#pragma unroll
			for (int u = 0; u < U; u++)
				if (v + u * step < h.nvec)
					r[u] = __ldg(src + v + u * step);
			if (!waited) { /* first loads in flight; no store before the previous kernel is done */
				pdl_wait();
				waited = true;
			}
#pragma unroll
			for (int u = 0; u < U; u++)
				if (v + u * step < h.nvec)
					dst[v + u * step] = r[u];
		}
	}
	if (h.done_flag) {
		/*
		 * Every thread of the block has its loads back (its stores used
		 * them): the last block to get here tells the host that the
		 * sources are read. No fence: the word promises nothing about
		 * the stores, which the stream orders as usual, and a fence
		 * here held back the next gather's stores (measured 15%).
		 */
		__syncthreads();
		if (threadIdx.x == 0 && atomicAdd(h.done_cnt, 1u) + 1u == h.done_at)
			*(volatile uint32_t *)h.done_flag = 1;
	}
}

/* Blocks of a gather of n copies. */
static uint32_t gather_grid(const struct cuda_backend *cb, const ckv_cuda_gather_cfg *cfg, uint32_t n)
{
	uint64_t grid = n;

	if (cfg->blocks_per_sm && grid > (uint64_t)cb->sms * cfg->blocks_per_sm)
		grid = (uint64_t)cb->sms * cfg->blocks_per_sm;
	if (grid > 0x7fffffff)
		grid = 0x7fffffff; /* the loop over copies covers the rest */
	return (uint32_t)grid;
}

template <int CAP>
static int launch_gather(const ckv_cuda_gather_cfg *cfg, const gather_params<CAP> *p, uint32_t grid,
			 bool pdl, cudaStream_t stream)
{
	cudaError_t e;
	cudaLaunchConfig_t lc = launch_cfg(dim3(grid), dim3(cfg->threads), stream);
	cudaLaunchAttribute attr[1];

	/*
	 * pdl: a gather from the arena with overlap on (gather_launch). From
	 * the arena (pinned, unchanging while the gather runs) with the
	 * descriptors in the kernel parameters, nothing it loads depends on
	 * earlier work on the stream: let it overlap the previous kernel's end
	 * (it waits before its first store). Device sources may be what that
	 * kernel writes, and ring descriptors come by a copy: ordinary launch.
	 */
	if (pdl && !p->h.descs) {
		attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
		attr[0].val.programmaticStreamSerializationAllowed = 1;
		lc.attrs = attr;
		lc.numAttrs = 1;
	}

	switch (cfg->unroll) {
	case 1:
		e = cudaLaunchKernelEx(&lc, gather_kernel<1, CAP>, *p);
		break;
	case 2:
		e = cudaLaunchKernelEx(&lc, gather_kernel<2, CAP>, *p);
		break;
	case 8:
		e = cudaLaunchKernelEx(&lc, gather_kernel<8, CAP>, *p);
		break;
	default:
		e = cudaLaunchKernelEx(&lc, gather_kernel<4, CAP>, *p);
		break;
	}
	return cu_rc(e, "cudaLaunchKernelEx(gather)");
}

/* n (<= CAP) copies described by desc(i) in the kernel parameters. */
template <int CAP, typename Desc>
static int launch_inline(const ckv_cuda_gather_cfg *cfg, const gather_head *h, uint32_t grid,
			 bool pdl, cudaStream_t s, Desc desc)
{
	gather_params<CAP> p;

	p.h = *h;
	for (uint32_t i = 0; i < h->n; i++)
		p.inl[i] = desc(i);
	return launch_gather(cfg, &p, grid, pdl, s);
}

/*
 * One launch for n copies described by desc(i) (a ckv_copy whose src is
 * relative to base): inline when they fit the kernel parameters (the
 * smallest block that holds them), else through the ring. from_arena: the
 * sources are arena chunks (see launch_gather). r: the record whose word
 * the kernel sets when done, or NULL.
 */
template <typename Desc>
static int gather_launch(struct cuda_backend *cb, uint64_t base, bool from_arena, uint32_t n,
			 uint64_t len, cudaStream_t s, struct after_rec *r, Desc desc)
{
	ckv_cuda_gather_cfg cfg;
	gather_head h;
	uint32_t inl, grid;
	bool pdl;
	dev_scope dev;
	int rc = dev.enter(cb->device);

	if (rc)
		return rc;
	h.base = base;
	h.descs = NULL;
	h.done_cnt = r ? cb->cnt_dev + r->fslot : NULL;
	h.done_flag = r ? cb->flag_dev + r->fslot : NULL;
	h.done_at = 0;
	h.n = n;
	h.nvec = (uint32_t)(len / 16);
	pthread_mutex_lock(&cb->lock);
	cfg = cb->cfg;
	pthread_mutex_unlock(&cb->lock);
	inl = cfg.inline_max && cfg.inline_max < cb->inline_limit ? cfg.inline_max : cb->inline_limit;
	grid = gather_grid(cb, &cfg, n);
	pdl = cb->pdl && cfg.overlap && from_arena;
	if (r)
		h.done_at = r->fblocks + grid;
	if (n <= GATHER_INLINE && n <= inl) {
		rc = launch_inline<GATHER_INLINE>(&cfg, &h, grid, pdl, s, desc);
#if CKV_BIG_PARAMS
	} else if (n <= GATHER_INLINE_MID && n <= inl) {
		rc = launch_inline<GATHER_INLINE_MID>(&cfg, &h, grid, pdl, s, desc);
	} else if (n <= inl) {
		rc = launch_inline<GATHER_INLINE_MAX>(&cfg, &h, grid, pdl, s, desc);
#endif
	} else {
		gather_params<GATHER_INLINE> p; /* the head; the copies go through the ring */

		p.h = h;
		rc = ring_launch(
			cb, (uint64_t)n * sizeof(ckv_copy), s,
			[&](unsigned char *slot) {
				ckv_copy *d = (ckv_copy *)slot;

				for (uint32_t i = 0; i < n; i++)
					d[i] = desc(i);
			},
			[&](unsigned char *dev_descs) {
				p.h.descs = (const ckv_copy *)dev_descs;
				return launch_gather(&cfg, &p, grid, pdl, s);
			});
	}
	if (rc == 0 && r)
		r->fblocks = h.done_at; /* the word's counter reaches this once the kernel has run */
	return rc;
}

static int gather_check(const struct cuda_backend *cb, const ckv_copy *c, uint32_t n, uint64_t len)
{
	if (len == 0 || len % 16 || len > MAX_COPY_LEN || (n && !c))
		return -EINVAL;
	if (!cb->arena_dev)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++) {
		if (c[i].src % 16 || (uintptr_t)c[i].dst % 16 || !c[i].dst)
			return -EINVAL;
		if (c[i].src > cb->arena_size || len > cb->arena_size - c[i].src)
			return -EINVAL;
	}
	return 0;
}

static int cuda_gather(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len, void *stream)
{
	struct cuda_backend *cb = cb_of(b);
	int rc = gather_check(cb, c, n, len);

	if (rc || n == 0)
		return rc;
	return gather_launch(cb, (uintptr_t)cb->arena_dev, true, n, len, (cudaStream_t)stream, NULL,
			     [c](uint32_t i) { return c[i]; });
}

/* Device to device (the loader's GPU tier): the same kernel, with absolute sources. */
static int cuda_gather_dev(ckv_backend *b, const void *const *src, void *const *dst, uint32_t n,
			   uint64_t len, void *stream)
{
	if (len == 0 || len % 16 || len > MAX_COPY_LEN || (n && (!src || !dst)))
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (!src[i] || !dst[i] || (uintptr_t)src[i] % 16 || (uintptr_t)dst[i] % 16)
			return -EINVAL;
	if (n == 0)
		return 0;
	return gather_launch(cb_of(b), 0, false, n, len, (cudaStream_t)stream, NULL, [src, dst](uint32_t i) {
		ckv_copy c;

		c.src = (uintptr_t)src[i];
		c.dst = dst[i];
		return c;
	});
}

/* ---- the other backend operations --------------------------------------- */

static int cuda_register_arena(ckv_backend *b, void *base, uint64_t size, bool readonly)
{
	struct cuda_backend *cb = cb_of(b);
	unsigned flags = cudaHostRegisterMapped | cudaHostRegisterPortable;
	void *dev_ptr;
	dev_scope dev;
	int rc;

	if (!base || size == 0)
		return -EINVAL;
	if (cb->arena_host)
		return -EBUSY;
	if (readonly) {
		/* a PROT_READ mapping registers only with this flag ("invalid argument" without) */
		if (!cb->ro_register) {
			fprintf(stderr, "ckvgpu: cuda: device %d cannot register read-only host "
					"memory (cudaDevAttrHostRegisterReadOnlySupported is 0)\n",
				cb->device);
			return -EOPNOTSUPP;
		}
		flags |= cudaHostRegisterReadOnly;
	}
	rc = dev.enter(cb->device);
	if (rc)
		return rc;
	rc = CU(cudaHostRegister(base, size, flags));
	if (rc)
		return rc;
	rc = CU(cudaHostGetDevicePointer(&dev_ptr, base, 0));
	if (rc)
		goto out_unregister;
	cb->arena_host = base;
	cb->arena_size = size;
	cb->arena_dev = (const char *)dev_ptr;
	return 0;

out_unregister:
	cu_rc(cudaHostUnregister(base), "cudaHostUnregister");
	return rc;
}

/*
 * The caller must have no gather of this arena in flight; to be safe against
 * a forgotten one (a kernel reading unmapped memory kills the context), wait
 * for the device first. Once per loader, at close.
 */
static void cuda_unregister_arena(ckv_backend *b)
{
	struct cuda_backend *cb = cb_of(b);
	dev_scope dev;

	if (!cb->arena_host || dev.enter(cb->device))
		return;
	cu_rc(cudaDeviceSynchronize(), "cudaDeviceSynchronize(unregister)");
	cu_rc(cudaHostUnregister(cb->arena_host), "cudaHostUnregister");
	cb->arena_host = NULL;
	cb->arena_dev = NULL;
	cb->arena_size = 0;
}

/*
 * Take the queue's head and run its callback (without the lock). The
 * record goes back to the spares, unless the reaper still waits on its
 * event: then it is marked taken and the reaper puts it back when it wakes
 * (it may not be re-recorded while the reaper waits on it). Caller holds
 * rlock.
 */
static void run_head(struct cuda_backend *cb)
{
	struct after_rec *r = cb->rq_head;

	cb->rq_head = r->next;
	if (!cb->rq_head)
		cb->rq_tail = NULL;
	cb->rq_running++;
	pthread_mutex_unlock(&cb->rlock);
	r->fn(r->arg);
	pthread_mutex_lock(&cb->rlock);
	cb->rq_running--;
	if (r == cb->rq_watch) {
		r->taken = true;
	} else {
		r->next = cb->rfree;
		cb->rfree = r;
	}
	pthread_cond_broadcast(&cb->rcond);
}

/* Whether r's point on its stream has passed: cudaSuccess, cudaErrorNotReady or an error. */
static cudaError_t rec_query(const struct cuda_backend *cb, const struct after_rec *r)
{
	if (!r->flagged)
		return cudaEventQuery(r->ev);
	return __atomic_load_n(&cb->flag_host[r->fslot], __ATOMIC_ACQUIRE) ? cudaSuccess
									    : cudaErrorNotReady;
}

/*
 * Wait for r by polling, sleeping 5 us doubling to 200 us between queries.
 * A blocking-sync event would let the thread sleep in the driver, but
 * recording one between two gathers costs the stream their overlap
 * (measured: one layer's 8 KiB chunk set per gather, 50 -> 38 GB/s). A
 * completion word is plain memory; at the longest sleep its stream is
 * asked too, so a stream that failed (the word never comes) or finished
 * ends the wait.
 */
static void rec_poll(const struct cuda_backend *cb, const struct after_rec *r)
{
	long ns = 5000;
	cudaError_t e;

	while ((e = rec_query(cb, r)) == cudaErrorNotReady) {
		struct timespec ts = { 0, ns };

		if (r->flagged && ns >= 200000) {
			e = cudaStreamQuery(r->stream);
			if (e != cudaErrorNotReady)
				break; /* done (its writes are visible now) or failed */
		}
		nanosleep(&ts, NULL);
		if (ns < 200000)
			ns *= 2;
	}
	if (e != cudaSuccess)
		cu_fail(e, r->flagged ? "cudaStreamQuery(after)" : "cudaEventQuery(after)");
}

/* The reaper: waits for each queued record in order and runs its callback. */
static void *reaper_main(void *arg)
{
	struct cuda_backend *cb = (struct cuda_backend *)arg;
	struct after_rec *r;

	cudaSetDevice(cb->device);
	/* the polls' short sleeps as asked, not stretched by the default 50 us slack */
	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
	pthread_mutex_lock(&cb->rlock);
	for (;;) {
		while (!cb->rq_head && !cb->reaper_stop)
			pthread_cond_wait(&cb->rcond, &cb->rlock);
		if (!cb->rq_head)
			break; /* stopping, and nothing left */
		r = cb->rq_head;
		cb->rq_watch = r;
		pthread_mutex_unlock(&cb->rlock);
		rec_poll(cb, r);
		pthread_mutex_lock(&cb->rlock);
		cb->rq_watch = NULL;
		if (r->taken) { /* a syncing thread ran it meanwhile: the spare is ours to keep */
			r->taken = false;
			r->next = cb->rfree;
			cb->rfree = r;
		} else if (cb->rq_head == r) {
			run_head(cb);
		}
		/* else a syncing thread is running it and, seeing it unwatched now, keeps the spare */
	}
	pthread_mutex_unlock(&cb->rlock);
	return NULL;
}

/* The completion words, on first need. Caller holds rlock. */
static void flags_init(struct cuda_backend *cb)
{
	if (cb->flag_host || cb->flags_failed)
		return;
	if (cudaHostAlloc((void **)&cb->flag_host, sizeof(uint32_t) * FLAG_SLOTS,
			  cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess ||
	    cudaHostGetDevicePointer((void **)&cb->flag_dev, cb->flag_host, 0) != cudaSuccess ||
	    cudaMalloc((void **)&cb->cnt_dev, sizeof(uint32_t) * FLAG_SLOTS) != cudaSuccess ||
	    cudaMemset(cb->cnt_dev, 0, sizeof(uint32_t) * FLAG_SLOTS) != cudaSuccess) {
		(void)cudaGetLastError(); /* not sticky: the backend goes on with events */
		if (cb->flag_host)
			cudaFreeHost(cb->flag_host);
		if (cb->cnt_dev)
			cudaFree(cb->cnt_dev);
		cb->flag_host = cb->flag_dev = cb->cnt_dev = NULL;
		cb->flags_failed = true;
	}
}

/* Back to the spares, unused. */
static void rec_put(struct cuda_backend *cb, struct after_rec *r)
{
	pthread_mutex_lock(&cb->rlock);
	r->next = cb->rfree;
	cb->rfree = r;
	pthread_mutex_unlock(&cb->rlock);
}

/*
 * A spare record (with its event, and a completion word while there are
 * words left), the reaper started. Current device: the backend's.
 */
static int rec_get(struct cuda_backend *cb, struct after_rec **out)
{
	struct after_rec *r;
	int rc;

	pthread_mutex_lock(&cb->rlock);
	if (!cb->reaper_running) {
		if (pthread_create(&cb->reaper, NULL, reaper_main, cb) != 0) {
			pthread_mutex_unlock(&cb->rlock);
			return -EAGAIN;
		}
		cb->reaper_running = true;
	}
	r = cb->rfree;
	if (r) {
		cb->rfree = r->next;
		pthread_mutex_unlock(&cb->rlock);
		*out = r;
		return 0;
	}
	r = (struct after_rec *)calloc(1, sizeof(*r));
	if (!r) {
		pthread_mutex_unlock(&cb->rlock);
		return -ENOMEM;
	}
	r->fslot = -1;
	flags_init(cb);
	if (cb->flag_host && cb->nflags < FLAG_SLOTS)
		r->fslot = cb->nflags++;
	pthread_mutex_unlock(&cb->rlock);
	rc = CU(cudaEventCreateWithFlags(&r->ev, cudaEventDisableTiming));
	if (rc) {
		free(r); /* its word, if any, stays unused */
		return rc;
	}
	*out = r;
	return 0;
}

/* Queue r (its event recorded, or its word armed) to run fn(arg). */
static void rec_queue(struct cuda_backend *cb, struct after_rec *r, cudaStream_t stream,
		      void (*fn)(void *arg), void *arg)
{
	pthread_mutex_lock(&cb->rlock);
	r->stream = stream;
	r->fn = fn;
	r->arg = arg;
	r->next = NULL;
	r->seq = ++cb->rq_seq;
	if (cb->rq_tail)
		cb->rq_tail->next = r;
	else
		cb->rq_head = r;
	cb->rq_tail = r;
	pthread_cond_broadcast(&cb->rcond);
	pthread_mutex_unlock(&cb->rlock);
}

/*
 * fn runs on the backend's reaper thread once the stream has passed this
 * point; it must not block and should not call CUDA.
 */
static int cuda_after(ckv_backend *b, void *stream, void (*fn)(void *arg), void *arg)
{
	struct cuda_backend *cb = cb_of(b);
	struct after_rec *r;
	dev_scope dev;
	int rc;

	if (!fn)
		return -EINVAL;
	rc = dev.enter(cb->device);
	if (rc == 0)
		rc = rec_get(cb, &r);
	if (rc)
		return rc;
	r->flagged = false;
	rc = CU(cudaEventRecord(r->ev, (cudaStream_t)stream));
	if (rc) {
		rec_put(cb, r);
		return rc;
	}
	rec_queue(cb, r, (cudaStream_t)stream, fn, arg);
	return 0;
}

/*
 * A gather, then fn once it has executed, without a stream operation of
 * its own between this gather and the next: the kernel sets the record's
 * completion word (a record without one falls back to an event).
 */
static int cuda_gather_then(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len,
			    void *stream, void (*fn)(void *arg), void *arg)
{
	struct cuda_backend *cb = cb_of(b);
	struct after_rec *r;
	dev_scope dev;
	int rc = gather_check(cb, c, n, len);

	if (rc == 0 && !fn)
		rc = -EINVAL;
	if (rc == 0)
		rc = dev.enter(cb->device);
	if (rc == 0)
		rc = rec_get(cb, &r);
	if (rc)
		return rc;
	if (n == 0 || r->fslot < 0) {
		rec_put(cb, r);
		rc = cuda_gather(b, c, n, len, stream);
		return rc ? rc : cuda_after(b, stream, fn, arg);
	}
	r->flagged = true;
	__atomic_store_n(&cb->flag_host[r->fslot], 0u, __ATOMIC_RELAXED);
	rc = gather_launch(cb, (uintptr_t)cb->arena_dev, true, n, len, (cudaStream_t)stream,
			   r, [c](uint32_t i) { return c[i]; });
	if (rc) {
		/* the kernel may have been launched (a failed ring commit): the word's count is unknown */
		r->fslot = -1;
		rec_put(cb, r);
		return rc;
	}
	rec_queue(cb, r, (cudaStream_t)stream, fn, arg);
	return 0;
}

/*
 * Wait until every callback queued so far has run (sync keeps its promise),
 * running those whose work has finished on this thread.
 */
static void reaper_wait(struct cuda_backend *cb)
{
	pthread_mutex_lock(&cb->rlock);
	uint64_t want = cb->rq_seq;
	for (;;) {
		while (cb->rq_head && cb->rq_head->seq <= want &&
		       rec_query(cb, cb->rq_head) == cudaSuccess)
			run_head(cb);
		if ((!cb->rq_head || cb->rq_head->seq > want) && cb->rq_running == 0)
			break;
		pthread_cond_wait(&cb->rcond, &cb->rlock);
	}
	pthread_mutex_unlock(&cb->rlock);
}

static int cuda_sync(ckv_backend *b, void *stream)
{
	dev_scope dev;
	int rc = dev.enter(cb_of(b)->device);

	if (rc)
		return rc;
	rc = CU(cudaStreamSynchronize((cudaStream_t)stream));
	/* callbacks of what the stream has run have run too, as with host funcs */
	reaper_wait(cb_of(b));
	return rc;
}

static int cuda_alloc(ckv_backend *b, uint64_t bytes, void **out)
{
	dev_scope dev;
	int rc;

	*out = NULL;
	if (bytes == 0)
		return 0;
	rc = dev.enter(cb_of(b)->device);
	if (rc)
		return rc;
	return CU(cudaMalloc(out, bytes));
}

/* cudaFree waits for the device: free only at set-up and tear-down. */
static void cuda_free(ckv_backend *b, void *p)
{
	dev_scope dev;

	if (!p || dev.enter(cb_of(b)->device))
		return;
	cu_rc(cudaFree(p), "cudaFree");
}

/*
 * Synchronous copies on the legacy default stream: they wait for work on
 * blocking streams, not on cudaStreamNonBlocking ones; call sync first.
 */
static int cuda_to_host(ckv_backend *b, void *host, const void *src, uint64_t len)
{
	dev_scope dev;
	int rc;

	if (len == 0)
		return 0;
	if (!host || !src)
		return -EINVAL;
	rc = dev.enter(cb_of(b)->device);
	if (rc)
		return rc;
	return CU(cudaMemcpy(host, src, len, cudaMemcpyDefault));
}

static int cuda_from_host(ckv_backend *b, void *dst, const void *host, uint64_t len)
{
	dev_scope dev;
	int rc;

	if (len == 0)
		return 0;
	if (!host || !dst)
		return -EINVAL;
	rc = dev.enter(cb_of(b)->device);
	if (rc)
		return rc;
	/*
	 * Not cudaMemcpy: from pageable memory it may return before the bytes
	 * land, and a caller's non-blocking stream is not ordered after it.
	 * Synchronous means done, for any stream that reads them next.
	 */
	rc = CU(cudaMemcpyAsync(dst, host, len, cudaMemcpyDefault, cudaStreamPerThread));
	if (rc == 0)
		rc = CU(cudaStreamSynchronize(cudaStreamPerThread));
	return rc;
}

/* ---- digest scores ------------------------------------------------------ */

/* a . b over n floats by one warp (lane = this thread's), the sum in every lane. */
__device__ __forceinline__ float warp_dot(const float *a, const float *b, uint32_t n,
					  uint32_t lane)
{
	float s = 0.0f;

	for (uint32_t e = lane; e < n; e += 32)
		s += __ldg(a + e) * __ldg(b + e);
	for (int o = 16; o; o >>= 1)
		s += __shfl_xor_sync(0xffffffffu, s, o);
	return s;
}

/*
 * score[j] = sum_t sum_h q[t][h] . dig[j][h / G] / sqrt(D)
 *          = sum_k qk[k] . dig[j][k],  qk[k] = sum_t sum_{h in group k} q[t][h] / sqrt(D)
 * so the query is summed once (q is the large input: q_tokens x q_heads x
 * D) and each chunk costs one kv_heads*D dot product. Three small kernels,
 * all on the caller's stream, with stream-ordered scratch:
 *   1. part[s][k][d]: token slice s of the sums (slices give the GPU enough
 *      threads when kv_heads*D alone is a few hundred);
 *   2. qk[k][d]: the slices summed, scaled by 1/sqrt(D);
 *   3. one warp per chunk: the dot product.
 * Deterministic (fixed summation order, no atomics).
 */
__global__ void digest_qsum_kernel(const float *__restrict__ q, uint32_t tokens, uint32_t q_heads,
				   uint32_t group, uint32_t hd, uint32_t per_slice,
				   float *__restrict__ part)
{
	uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; /* kv head k, dim d */
	uint32_t kvd = hd * (q_heads / group);

	if (e >= kvd)
		return;
	uint32_t k = e / hd, d = e - k * hd;
	uint64_t t0 = (uint64_t)blockIdx.y * per_slice;
	uint64_t t1 = t0 + per_slice < tokens ? t0 + per_slice : tokens;
	const float *qp = q + (uint64_t)k * group * hd + d;
	uint64_t row = (uint64_t)q_heads * hd;
	float acc[4] = { 0, 0, 0, 0 };

	for (uint64_t t = t0; t < t1; t++) {
		const float *qt = qp + t * row;
		uint32_t g = 0;

		for (; g + 4 <= group; g += 4) {
#pragma unroll
			for (int u = 0; u < 4; u++)
				acc[u] += __ldg(qt + (g + u) * hd);
		}
		for (; g < group; g++)
			acc[0] += __ldg(qt + g * hd);
	}
	part[(uint64_t)blockIdx.y * kvd + e] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* blockDim (32, 8): x over 32 columns of qk, y over slices, reduced in shared memory */
__global__ void digest_reduce_kernel(const float *__restrict__ part, uint32_t slices, uint32_t kvd,
				     float scale, float *__restrict__ qk)
{
	__shared__ float red[8][33];
	uint32_t e = blockIdx.x * 32 + threadIdx.x;
	float s = 0.0f;

	if (e < kvd)
		for (uint32_t i = threadIdx.y; i < slices; i += 8)
			s += part[(uint64_t)i * kvd + e];
	red[threadIdx.y][threadIdx.x] = s;
	__syncthreads();
	if (threadIdx.y == 0 && e < kvd) {
		for (int y = 1; y < 8; y++)
			s += red[y][threadIdx.x];
		qk[e] = s * scale;
	}
}

__global__ void digest_dot_kernel(const float *__restrict__ qk, const float *__restrict__ dig,
				  uint32_t m, uint32_t kvd, float *__restrict__ scores)
{
	uint32_t lane = threadIdx.x % 32;
	uint64_t j = (uint64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;

	if (j >= m)
		return;
	const float s = warp_dot(qk, dig + j * kvd, kvd, lane);

	if (lane == 0)
		scores[j] = s;
}

static int cuda_digest_scores(ckv_backend *b, const float *q, uint32_t q_tokens, uint32_t q_heads,
			      const float *dig, uint32_t m, uint32_t kv_heads, uint32_t head_dim,
			      float *scores, void *stream)
{
	struct cuda_backend *cb = cb_of(b);
	cudaStream_t s = (cudaStream_t)stream;
	uint64_t kvd = (uint64_t)kv_heads * head_dim;
	float *scratch = NULL;
	dev_scope dev;
	int rc;

	if (!q_heads || !kv_heads || !head_dim || q_heads % kv_heads)
		return -EINVAL;
	if (kvd > (1u << 24) || (uint64_t)q_heads * head_dim > (1u << 24))
		return -EOVERFLOW;
	if (m == 0)
		return 0;
	if (!dig || !scores || (q_tokens && !q))
		return -EINVAL;
	rc = dev.enter(cb->device);
	if (rc)
		return rc;
	if (q_tokens == 0)
		return CU(cudaMemsetAsync(scores, 0, (size_t)m * sizeof(float), s));

	/* enough slices for ~2048 threads per SM, each slice at least 4 tokens */
	uint64_t want = ((uint64_t)cb->sms * 2048 + kvd - 1) / kvd;
	uint64_t slices = (q_tokens + 3) / 4;

	if (slices > want)
		slices = want;
	if (slices > 4096)
		slices = 4096;
	if (slices == 0)
		slices = 1;
	uint32_t per_slice = (uint32_t)((q_tokens + slices - 1) / slices);

	slices = (q_tokens + per_slice - 1) / per_slice;
	rc = CU(cudaMallocAsync((void **)&scratch, (slices + 1) * kvd * sizeof(float), s));
	if (rc)
		return rc;

	float *qk = scratch + slices * kvd;
	cudaLaunchConfig_t lc = launch_cfg(dim3((unsigned)((kvd + 255) / 256), (unsigned)slices),
					   dim3(256), s);

	rc = CU(cudaLaunchKernelEx(&lc, digest_qsum_kernel, q, q_tokens, q_heads,
				   q_heads / kv_heads, head_dim, per_slice, scratch));
	if (rc == 0) {
		lc = launch_cfg(dim3((unsigned)((kvd + 31) / 32)), dim3(32, 8), s);
		rc = CU(cudaLaunchKernelEx(&lc, digest_reduce_kernel, (const float *)scratch,
					   (uint32_t)slices, (uint32_t)kvd,
					   1.0f / sqrtf((float)head_dim), qk));
	}
	if (rc == 0) {
		lc = launch_cfg(dim3((m + 7) / 8), dim3(256), s);
		rc = CU(cudaLaunchKernelEx(&lc, digest_dot_kernel, (const float *)qk, dig, m,
					   (uint32_t)kvd, scores));
	}
	int rc2 = CU(cudaFreeAsync(scratch, s));

	return rc ? rc : rc2;
}

/* ---- attention mass over the key copy ------------------------------------ */

/*
 * The steps of ckv_keyq_mass_cpu (gpu/select.c), on the device:
 *   keyq_lse_*kernel  one block per (chunk j, kv head h): the chunk's keys of
 *                     that head decoded into shared memory, then for every
 *                     query row of the head (token t, query head of the
 *                     group) the log-sum-exp of q . k / sqrt(D) over the
 *                     chunk's valid slots -> clse[h][row][j];
 *   keyq_row_kernel   one block per (row, h): the row's log-sum-exp over
 *                     every chunk and, with keys, the new tokens up to its
 *                     own -> lse[h][row];
 *   keyq_mass_kernel  per chunk: the sum over rows of exp(clse - lse), in
 *                     double as on the CPU, in a fixed order (the same
 *                     floats every run).
 * The sums run in another order than the CPU's, so the scores agree to
 * rounding, not bit for bit (tests/gpu/test_loader_gpu.c compares them).
 */
#define KQ_THREADS 128

__device__ __forceinline__ float bf16_f32(uint16_t h)
{
	return __uint_as_float((uint32_t)h << 16);
}

/*
 * Chunk j's keys of head h as the copy gives them back, into ks[c][D + 1]
 * (the padding keeps the slots in distinct banks); the chunk's valid slots.
 */
__device__ uint32_t keyq_decode(const ckv_keyq_dev &k, uint32_t j, uint32_t h, float *ks)
{
	const uint32_t D = k.head_dim, c = k.chunk_tokens, stride = D + 1;
	const uint64_t HD = (uint64_t)k.kv_heads * D, lo = (uint64_t)j * c;
	const uint8_t *codes = k.codes + (uint64_t)j * k.per;
	const uint16_t *sc = k.scales + (uint64_t)k.part[j] * 2 * HD + (uint64_t)h * D;
	const unsigned mask = (1u << k.bits) - 1;

	for (uint32_t e = threadIdx.x; e < c * D; e += blockDim.x) {
		const uint32_t t = e / D, d = e - t * D;
		const uint64_t i = ((uint64_t)h * c + t) * D + d, bit = i * k.bits, byte = bit >> 3;
		const unsigned v = codes[byte] | (byte + 1 < k.per ? (unsigned)codes[byte + 1] << 8 : 0u);

		ks[t * stride + d] = bf16_f32(sc[d]) + bf16_f32(sc[HD + d]) * k.levels[(v >> (bit & 7)) & mask];
	}
	__syncthreads();
	return lo + c <= k.tokens ? c : k.tokens > lo ? (uint32_t)(k.tokens - lo) : 0;
}

/*
 * The log-sum-exp of x[0..N) of every lane of an aligned group of width
 * lanes (a power of two), in each of them: mx + log(sum exp(x - mx)).
 * Every lane of the warp must call it (shuffles).
 */
template <int N>
__device__ __forceinline__ float group_lse(const float (&x)[N], uint32_t width)
{
	float mx = -INFINITY, e = 0;

#pragma unroll
	for (int i = 0; i < N; i++)
		mx = fmaxf(mx, x[i]);
	for (uint32_t o = width / 2; o; o >>= 1)
		mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#pragma unroll
	for (int i = 0; i < N; i++)
		e += x[i] == -INFINITY ? 0.0f : expf(x[i] - mx);
	for (uint32_t o = width / 2; o; o >>= 1)
		e += __shfl_xor_sync(0xffffffffu, e, o);
	return mx + logf(e);
}

/*
 * Chunks of 16 or 32 slots (G = c / 4 threads a row tile, 4 rows x 4 slots
 * a thread). The block's rows go in passes of tiles * 4; each pass stages
 * its queries in shared memory KQ_DB dimensions at a time (coalesced
 * loads), so that a d step is 8 conflict-free shared loads for 16
 * multiply-adds. The G threads of a tile then reduce each row's slots.
 */
#define KQ_DB 32

template <int G>
__global__ void keyq_lse_tiled_kernel(const __grid_constant__ ckv_keyq_dev k, const float *__restrict__ q,
				      uint32_t q_heads, uint32_t rows, float inv, float *__restrict__ clse)
{
	extern __shared__ float ks[]; /* [c][D + 1] keys, then [pass rows][KQ_DB + 1] queries */
	const uint32_t j = blockIdx.x, h = blockIdx.y, D = k.head_dim, stride = D + 1;
	const uint32_t g = q_heads / k.kv_heads, valid = keyq_decode(k, j, h, ks);
	const uint32_t sg = threadIdx.x % G, tiles = blockDim.x / G, prow = tiles * 4;
	const uint32_t tr = threadIdx.x / G * 4; /* the thread's first row in a pass */
	const float *kp = ks + sg * 4 * stride;
	float *qs = ks + k.chunk_tokens * stride;

	/* the same trip count for every thread: the shuffles below need whole warps */
	for (uint32_t base = 0; base < rows; base += prow) {
		float acc[4][4] = {};

		for (uint32_t d0 = 0; d0 < D; d0 += KQ_DB) {
			const uint32_t db = D - d0 < KQ_DB ? D - d0 : KQ_DB;

			__syncthreads(); /* the previous block of queries is used up */
			for (uint32_t e = threadIdx.x; e < prow * db; e += blockDim.x) {
				const uint32_t rr = e / db, dd = e - rr * db, r = base + rr;

				qs[rr * (KQ_DB + 1) + dd] =
					r < rows ? __ldg(q + ((uint64_t)(r / g) * q_heads + (uint64_t)h * g +
							      r % g) * D + d0 + dd) :
						   0.0f;
			}
			__syncthreads();
			for (uint32_t dd = 0; dd < db; dd++) {
				float qv[4], kv[4];

#pragma unroll
				for (int i = 0; i < 4; i++)
					qv[i] = qs[(tr + i) * (KQ_DB + 1) + dd];
#pragma unroll
				for (int s = 0; s < 4; s++)
					kv[s] = kp[s * stride + d0 + dd];
#pragma unroll
				for (int i = 0; i < 4; i++)
#pragma unroll
					for (int s = 0; s < 4; s++)
						acc[i][s] += qv[i] * kv[s];
			}
		}
#pragma unroll
		for (int i = 0; i < 4; i++) {
			const uint32_t r = base + tr + i;
			float x[4];

#pragma unroll
			for (int s = 0; s < 4; s++)
				x[s] = sg * 4 + s < valid ? acc[i][s] * inv : -INFINITY;
			const float lse = group_lse(x, G);

			if (sg == 0 && r < rows)
				clse[((uint64_t)h * rows + r) * k.m + j] = valid ? lse : -INFINITY;
		}
	}
}

/* Any chunk size up to 32: a lane a slot (lanes: c rounded up to a power of two). */
__global__ void keyq_lse_kernel(const __grid_constant__ ckv_keyq_dev k, const float *__restrict__ q, uint32_t q_heads,
				uint32_t rows, uint32_t lanes, float inv, float *__restrict__ clse)
{
	extern __shared__ float ks[];
	const uint32_t j = blockIdx.x, h = blockIdx.y, D = k.head_dim;
	const uint32_t g = q_heads / k.kv_heads, stride = D + 1, valid = keyq_decode(k, j, h, ks);

	const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, per_warp = 32 / lanes;
	const uint32_t sub = lane / lanes, s = lane % lanes;

	for (uint32_t r0 = warp * per_warp; r0 < rows; r0 += (blockDim.x / 32) * per_warp) {
		const uint32_t r = r0 + sub;
		float x[1] = { -INFINITY };

		if (r < rows && s < valid) {
			const float *qr = q + ((uint64_t)(r / g) * q_heads + (uint64_t)h * g + r % g) * D;
			const float *kr = ks + s * stride;
			float dot = 0;

			for (uint32_t d = 0; d < D; d++)
				dot += __ldg(qr + d) * kr[d];
			x[0] = dot * inv;
		}
		const float lse = group_lse(x, lanes); /* every lane takes part in the shuffles */

		if (s == 0 && r < rows)
			clse[((uint64_t)h * rows + r) * k.m + j] = valid ? lse : -INFINITY;
	}
}

__device__ double block_reduce(double v, bool max, double *red)
{
	for (int o = 16; o; o >>= 1) {
		double w = __shfl_xor_sync(0xffffffffu, v, o);

		v = max ? fmax(v, w) : v + w;
	}
	if (threadIdx.x % 32 == 0)
		red[threadIdx.x / 32] = v;
	__syncthreads();
	v = red[0];
	for (uint32_t w = 1; w < blockDim.x / 32; w++)
		v = max ? fmax(v, red[w]) : v + red[w];
	__syncthreads(); /* red is reused */
	return v;
}

/* The new token tt's key of head h against row r's query, scaled; one thread. */
__device__ float keyq_suffix(const float *qr, const float *keys, uint32_t tt, uint32_t H,
			     uint32_t h, uint32_t D, float inv)
{
	const float *kk = keys + ((uint64_t)tt * H + h) * D;
	float dot = 0;

	for (uint32_t d = 0; d < D; d++)
		dot += __ldg(qr + d) * __ldg(kk + d);
	return dot * inv;
}

/*
 * suf_smem: the row's logits on the new tokens' keys are computed once, a
 * warp a key (coalesced loads), into shared memory of q_tokens floats;
 * else (too many new tokens for it) by each thread, twice.
 */
__global__ void keyq_row_kernel(const float *__restrict__ clse, const float *__restrict__ q,
				const float *__restrict__ keys, uint32_t q_heads, uint32_t rows,
				uint32_t m, uint32_t H, uint32_t D, float inv, bool suf_smem,
				float *__restrict__ lse)
{
	extern __shared__ float suf[];
	__shared__ double red[32];
	const uint32_t r = blockIdx.x, h = blockIdx.y, g = q_heads / H, tok = r / g;
	const float *cl = clse + ((uint64_t)h * rows + r) * m;
	const float *qr = q + ((uint64_t)tok * q_heads + (uint64_t)h * g + r % g) * D;
	const uint32_t nsuf = keys ? tok + 1 : 0;
	double mx = -INFINITY, tot = 0;

	if (suf_smem && nsuf) {
		const uint32_t lane = threadIdx.x % 32, nw = blockDim.x / 32;

		for (uint32_t t = threadIdx.x / 32; t < nsuf; t += nw) { /* the same t across a warp */
			const float dot = warp_dot(qr, keys + ((uint64_t)t * H + h) * D, D, lane);

			if (lane == 0)
				suf[t] = dot * inv;
		}
		__syncthreads();
	}
	for (uint32_t j = threadIdx.x; j < m; j += blockDim.x)
		mx = fmax(mx, (double)cl[j]);
	for (uint32_t t = threadIdx.x; t < nsuf; t += blockDim.x)
		mx = fmax(mx, (double)(suf_smem ? suf[t] : keyq_suffix(qr, keys, t, H, h, D, inv)));
	mx = block_reduce(mx, true, red);
	if (mx == -INFINITY) { /* no valid slot anywhere: the row adds nothing */
		if (threadIdx.x == 0)
			lse[(uint64_t)h * rows + r] = INFINITY;
		return;
	}
	for (uint32_t j = threadIdx.x; j < m; j += blockDim.x)
		tot += exp((double)cl[j] - mx);
	for (uint32_t t = threadIdx.x; t < nsuf; t += blockDim.x)
		tot += exp((double)(suf_smem ? suf[t] : keyq_suffix(qr, keys, t, H, h, D, inv)) - mx);
	tot = block_reduce(tot, false, red);
	if (threadIdx.x == 0)
		lse[(uint64_t)h * rows + r] = (float)(mx + log(tot));
}

/* Blocks of 32 chunks x 8 row slices; the slices' sums are added in a fixed order. */
__global__ void keyq_mass_kernel(const float *__restrict__ clse, const float *__restrict__ lse,
				 uint32_t nrows, uint32_t m, float *__restrict__ scores)
{
	__shared__ double part[8][32];
	const uint32_t lane = threadIdx.x % 32, w = threadIdx.x / 32, j = blockIdx.x * 32 + lane;
	double acc = 0;

	if (j < m)
		for (uint32_t x = w; x < nrows; x += 8)
			acc += exp((double)clse[(uint64_t)x * m + j] - (double)lse[x]);
	part[w][lane] = acc;
	__syncthreads();
	if (w == 0 && j < m) {
		for (int y = 1; y < 8; y++)
			acc += part[y][lane];
		scores[j] = (float)acc;
	}
}

static int cuda_keyq_scores(ckv_backend *b, const ckv_keyq_dev *k, const float *q,
			    const float *keys, uint32_t q_tokens, uint32_t q_heads, float *scores,
			    void *stream)
{
	struct cuda_backend *cb = cb_of(b);
	cudaStream_t s = (cudaStream_t)stream;
	uint32_t H, D, c, lanes = 1;
	uint64_t rows, cells;
	float *scratch = NULL, inv;
	size_t smem, tiled;
	dev_scope dev;
	int rc;

	if (!k || !q || !scores || !k->codes || !k->scales || !k->part)
		return -EINVAL;
	H = k->kv_heads;
	D = k->head_dim;
	c = k->chunk_tokens;
	if (!H || !D || !c || !q_heads || q_heads % H || !q_tokens || k->bits < 1 || k->bits > 4)
		return -EINVAL;
	if (c > CKV_KEYQ_DEV_MAX_CHUNK || H > 65535)
		return -ENOTSUP; /* one lane a slot; one grid row a head */
	if (k->m == 0)
		return 0;
	while (lanes < c)
		lanes *= 2;
	rows = (uint64_t)q_tokens * (q_heads / H);
	cells = (uint64_t)H * rows;
	smem = (size_t)c * (D + 1) * sizeof(float);
	if (smem > 48 * 1024)
		return -ENOTSUP; /* a chunk's keys of one head must fit shared memory */
	if (rows > 0x7fffffff || cells * k->m > (1ull << 40))
		return -EOVERFLOW;
	rc = dev.enter(cb->device);
	if (rc)
		return rc;
	inv = (float)(1.0 / sqrt((double)D));
	rc = CU(cudaMallocAsync((void **)&scratch, (cells * k->m + cells) * sizeof(float), s));
	if (rc)
		return rc;

	float *clse = scratch, *lse = scratch + cells * k->m;
	cudaLaunchConfig_t lc = launch_cfg(dim3(k->m, H), dim3(KQ_THREADS), s);

	/* 16- and 32-token chunks tiled (their queries staged too), others a lane a slot */
	tiled = 0;
	if (c == 16 || c == 32) /* the keys, then a pass's queries: KQ_THREADS / (c / 4) tiles of 4 rows */
		tiled = smem + (size_t)(KQ_THREADS / (c / 4)) * 4 * (KQ_DB + 1) * sizeof(float);
	if (tiled && tiled <= 48 * 1024) {
		lc.dynamicSmemBytes = tiled;
		if (c == 16)
			rc = CU(cudaLaunchKernelEx(&lc, keyq_lse_tiled_kernel<4>, *k, q, q_heads,
						   (uint32_t)rows, inv, clse));
		else
			rc = CU(cudaLaunchKernelEx(&lc, keyq_lse_tiled_kernel<8>, *k, q, q_heads,
						   (uint32_t)rows, inv, clse));
	} else {
		lc.dynamicSmemBytes = smem;
		rc = CU(cudaLaunchKernelEx(&lc, keyq_lse_kernel, *k, q, q_heads, (uint32_t)rows, lanes,
					   inv, clse));
	}
	if (rc == 0) {
		bool suf_smem = keys && (uint64_t)q_tokens * sizeof(float) <= 32 * 1024;

		lc = launch_cfg(dim3((unsigned)rows, H), dim3(256), s);
		lc.dynamicSmemBytes = suf_smem ? q_tokens * sizeof(float) : 0;
		rc = CU(cudaLaunchKernelEx(&lc, keyq_row_kernel, (const float *)clse, q, keys, q_heads,
					   (uint32_t)rows, k->m, H, D, inv, suf_smem, lse));
	}
	if (rc == 0) {
		lc = launch_cfg(dim3((k->m + 31) / 32), dim3(256), s);
		rc = CU(cudaLaunchKernelEx(&lc, keyq_mass_kernel, (const float *)clse,
					   (const float *)lse, (uint32_t)cells, k->m, scores));
	}
	int rc2 = CU(cudaFreeAsync(scratch, s));

	return rc ? rc : rc2;
}

/* ---- compute replay ----------------------------------------------------- */

/*
 * Hold the stream for ns nanoseconds of %globaltimer (wall clock, so the
 * replay is independent of clocks and of what else runs). One warp: it
 * occupies the stream, not the SMs, so gathers on other streams overlap it
 * as they would overlap compute that leaves them room.
 */
__global__ void spin_kernel(uint64_t ns)
{
	uint64_t t0, t;

	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
	do {
		asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
	} while (t - t0 < ns);
}

static int cuda_compute(ckv_backend *b, double seconds, void *stream)
{
	dev_scope dev;
	int rc;

	if (!(seconds >= 0.0) || seconds > 3600.0)
		return -EINVAL; /* also NaN */
	if (seconds == 0.0)
		return 0;
	rc = dev.enter(cb_of(b)->device);
	if (rc)
		return rc;

	cudaLaunchConfig_t lc = launch_cfg(dim3(1), dim3(32), (cudaStream_t)stream);

	return CU(cudaLaunchKernelEx(&lc, spin_kernel, (uint64_t)(seconds * 1e9)));
}

/* ---- scatter into a paged KV cache -------------------------------------- */

struct scatter_params {
	const char *base;        /* chunk i at base + offs[i] */
	const uint64_t *offs;    /* in the ring, or NULL: inl[] */
	const int64_t *slots;    /* [n][c] */
	char *kc, *vc;
	uint64_t half;           /* bytes of the K half of a chunk */
	uint64_t block_stride;   /* bytes */
	uint64_t nslots;         /* num_blocks * block_size */
	uint64_t tok_bytes;      /* kv_heads * row bytes: one token in the cache */
	uint32_t n, c, vrow;     /* vrow: vectors per (head, token) row */
	uint32_t block_size;
	uint64_t inl[SCATTER_INLINE];
};

/*
 * One block per chunk (grid-stride beyond 2^31). A chunk half is
 * [kv_heads][c][head_dim], the cache [block][block_size][kv_heads][head_dim]:
 * each (head, token) row of head_dim elements is contiguous on both sides,
 * so threads take consecutive V-sized vectors of the chunk (coalesced reads,
 * U in flight as in the gather) and each lands inside one row of the cache.
 * The chunk's token-to-cache offsets are resolved once per chunk into
 * shared memory (-1: skip the token).
 */
template <typename V, int U>
__global__ void scatter_kernel(const __grid_constant__ scatter_params p)
{
	extern __shared__ long long s_off[]; /* [c]: byte offset of token t's row 0 in a cache */
	const uint32_t step = blockDim.x;
	const uint32_t per_half = (uint32_t)(p.half / sizeof(V));

	for (uint32_t i = blockIdx.x; i < p.n; i += gridDim.x) {
		__syncthreads(); /* the previous chunk's readers of s_off are done */
		for (uint32_t t = threadIdx.x; t < p.c; t += step) {
			long long sl = p.slots[(uint64_t)i * p.c + t];

			s_off[t] = sl < 0 || (uint64_t)sl >= p.nslots
					   ? -1
					   : (long long)((uint64_t)sl / p.block_size * p.block_stride +
							 (uint64_t)sl % p.block_size * p.tok_bytes);
		}
		__syncthreads();

		const V *src = reinterpret_cast<const V *>(p.base + (p.offs ? p.offs[i] : p.inl[i]));

		for (uint32_t v = threadIdx.x; v < 2 * per_half; v += U * step) {
			V r[U];
			V *d[U];

#pragma unroll
			for (int u = 0; u < U; u++) {
				uint32_t k = v + u * step;

				d[u] = nullptr;
				if (k < 2 * per_half) {
					bool is_v = k >= per_half;
					uint32_t kk = is_v ? k - per_half : k;
					uint32_t row = kk / p.vrow; /* h * c + t */
					uint32_t h = row / p.c, t = row - h * p.c;
					long long o = s_off[t];

					if (o >= 0)
						d[u] = reinterpret_cast<V *>((is_v ? p.vc : p.kc) + o) +
						       (uint64_t)h * p.vrow + (kk - row * p.vrow);
				}
			}
#pragma unroll
			for (int u = 0; u < U; u++)
				if (d[u])
					r[u] = src[v + u * step];
#pragma unroll
			for (int u = 0; u < U; u++)
				if (d[u])
					*d[u] = r[u];
		}
	}
}

template <typename V>
static cudaError_t launch_scatter_v(const scatter_params *p, cudaStream_t s)
{
	uint64_t grid = p->n < 0x7fffffffu ? p->n : 0x7fffffffu;
	cudaLaunchConfig_t lc = launch_cfg(dim3((unsigned)grid), dim3(256), s);

	lc.dynamicSmemBytes = (size_t)p->c * sizeof(long long);
	return cudaLaunchKernelEx(&lc, scatter_kernel<V, 4>, *p);
}

int ckv_cuda_scatter_paged(ckv_backend *b, const void *src_base, const uint64_t *src, uint32_t n,
			   const ckv_paged_geom *g, const int64_t *slot_mapping, void *k_cache,
			   void *v_cache, void *stream)
{
	struct cuda_backend *cb;
	cudaStream_t s = (cudaStream_t)stream;
	scatter_params p;
	uint64_t row, align;
	dev_scope dev;
	int rc;

	if (!b || b->ops->gather != cuda_gather || !g || (n && (!src || !slot_mapping)))
		return -EINVAL;
	cb = cb_of(b);
	if (!g->kv_heads || !g->head_dim || !g->chunk_tokens || g->chunk_tokens > MAX_CHUNK_TOKENS ||
	    !g->block_size || !g->num_blocks || !k_cache || !v_cache)
		return -EINVAL;
	if (g->elem_bytes != 1 && g->elem_bytes != 2 && g->elem_bytes != 4)
		return -EINVAL;
	row = (uint64_t)g->head_dim * g->elem_bytes;
	if (row > (1u << 20) || g->kv_heads > (1u << 16))
		return -EINVAL;
	p.half = row * g->chunk_tokens * g->kv_heads;
	p.tok_bytes = row * g->kv_heads;
	p.block_stride = g->block_stride ? g->block_stride : p.tok_bytes * g->block_size;
	if (p.half > (1u << 30) || g->num_blocks > UINT64_MAX / g->block_size)
		return -EINVAL;
	p.nslots = g->num_blocks * g->block_size;
	if (!src_base) {
		if (!cb->arena_dev)
			return -EINVAL;
		for (uint32_t i = 0; i < n; i++)
			if (src[i] > cb->arena_size || 2 * p.half > cb->arena_size - src[i])
				return -EINVAL;
		src_base = cb->arena_dev;
	}
	if (n == 0)
		return 0;

	/* the widest vector every address and stride is a multiple of */
	align = row | p.block_stride | (uintptr_t)src_base | (uintptr_t)k_cache | (uintptr_t)v_cache;
	for (uint32_t i = 0; i < n; i++)
		align |= src[i];
	align &= -align; /* lowest set bit */
	if (align % g->elem_bytes)
		return -EINVAL;
	if (align > 16)
		align = 16;

	rc = dev.enter(cb->device);
	if (rc)
		return rc;
	p.base = (const char *)src_base;
	p.offs = NULL;
	p.slots = slot_mapping;
	p.kc = (char *)k_cache;
	p.vc = (char *)v_cache;
	p.n = n;
	p.c = g->chunk_tokens;
	p.vrow = (uint32_t)(row / align);
	p.block_size = g->block_size;

	auto launch = [&]() {
		cudaError_t e;

		switch (align) {
		case 16:
			e = launch_scatter_v<uint4>(&p, s);
			break;
		case 8:
			e = launch_scatter_v<uint2>(&p, s);
			break;
		case 4:
			e = launch_scatter_v<uint32_t>(&p, s);
			break;
		case 2:
			e = launch_scatter_v<uint16_t>(&p, s);
			break;
		default:
			e = launch_scatter_v<uint8_t>(&p, s);
			break;
		}
		return cu_rc(e, "cudaLaunchKernelEx(scatter_paged)");
	};
	static_assert(sizeof(scatter_params) <= 4096, "kernel parameters must fit 4 KiB");
	if (n <= SCATTER_INLINE) {
		memcpy(p.inl, src, n * sizeof(*src));
		return launch();
	}
	return ring_launch(
		cb, (uint64_t)n * sizeof(*src), s,
		[&](unsigned char *slot) { memcpy(slot, src, n * sizeof(*src)); },
		[&](unsigned char *dev_offs) {
			p.offs = (const uint64_t *)dev_offs;
			return launch();
		});
}

/* ---- configuration, creation, destruction -------------------------------- */

void ckv_cuda_get_gather_cfg(ckv_backend *b, ckv_cuda_gather_cfg *cfg)
{
	struct cuda_backend *cb = cb_of(b);

	if (!b || b->ops->gather != cuda_gather) {
		memset(cfg, 0, sizeof(*cfg));
		return;
	}
	pthread_mutex_lock(&cb->lock);
	*cfg = cb->cfg;
	cfg->ring_bytes = (uint32_t)cb->ring_size;
	pthread_mutex_unlock(&cb->lock);
}

int ckv_cuda_set_gather_cfg(ckv_backend *b, const ckv_cuda_gather_cfg *cfg)
{
	struct cuda_backend *cb;
	dev_scope dev;
	int rc = 0;

	if (!b || b->ops->gather != cuda_gather || !cfg)
		return -EINVAL;
	cb = cb_of(b);
	if (cfg->threads < 64 || cfg->threads > 1024 || cfg->threads % 32)
		return -EINVAL;
	if (cfg->unroll != 1 && cfg->unroll != 2 && cfg->unroll != 4 && cfg->unroll != 8)
		return -EINVAL;
	if (cfg->blocks_per_sm > 64 || cfg->overlap > 1 || cfg->ring_bytes < 4096 ||
	    cfg->inline_max > GATHER_INLINE_MAX)
		return -EINVAL;
	rc = dev.enter(cb->device);
	if (rc)
		return rc;
	pthread_mutex_lock(&cb->lock);
	if (cfg->ring_bytes != cb->ring_size)
		rc = ring_resize(cb, cfg->ring_bytes);
	if (rc == 0) {
		cb->cfg = *cfg;
		cb->cfg.ring_bytes = (uint32_t)cb->ring_size;
	}
	pthread_mutex_unlock(&cb->lock);
	return rc;
}

static void cuda_destroy(ckv_backend *b)
{
	struct cuda_backend *cb = cb_of(b);
	dev_scope dev;

	pthread_mutex_lock(&cb->rlock);
	cb->reaper_stop = true;
	pthread_cond_broadcast(&cb->rcond);
	pthread_mutex_unlock(&cb->rlock);
	if (cb->reaper_running)
		pthread_join(cb->reaper, NULL); /* runs every callback still queued */
	while (cb->rfree) {
		struct after_rec *r = cb->rfree;
		cb->rfree = r->next;
		cudaEventDestroy(r->ev);
		free(r);
	}
	pthread_cond_destroy(&cb->rcond);
	pthread_mutex_destroy(&cb->rlock);

	if (dev.enter(cb->device) == 0) {
		if (cb->flag_host) { /* every record's callback has run: no kernel sets a word */
			cu_rc(cudaFreeHost(cb->flag_host), "cudaFreeHost(flags)");
			cu_rc(cudaFree(cb->cnt_dev), "cudaFree(flags)");
		}
		pthread_mutex_lock(&cb->lock);
		ring_drain(cb);
		for (int i = 0; i < RING_RECS; i++)
			if (cb->recs[i].ev)
				cu_rc(cudaEventDestroy(cb->recs[i].ev), "cudaEventDestroy");
		ring_free(cb);
		pthread_mutex_unlock(&cb->lock);
		cuda_unregister_arena(b);
	}
	pthread_mutex_destroy(&cb->lock);
	free(cb);
}

static const struct ckv_backend_ops cuda_ops = {
	/* .name = */ "cuda",
	/* .register_arena = */ cuda_register_arena,
	/* .unregister_arena = */ cuda_unregister_arena,
	/* .gather = */ cuda_gather,
	/* .after = */ cuda_after,
	/* .sync = */ cuda_sync,
	/* .alloc = */ cuda_alloc,
	/* .free = */ cuda_free,
	/* .to_host = */ cuda_to_host,
	/* .from_host = */ cuda_from_host,
	/* .digest_scores = */ cuda_digest_scores,
	/* .keyq_scores = */ cuda_keyq_scores,
	/* .compute = */ cuda_compute,
	/* .gather_dev = */ cuda_gather_dev,
	/* .gather_then = */ cuda_gather_then,
	/* .destroy = */ cuda_destroy,
};

extern "C" bool ckv_backend_cuda_built(void)
{
	return true;
}

/*
 * -ENODEV, quietly, when there is no usable device (no driver, no GPU, an
 * ordinal past the last): the AUTO backend choice asks on every machine.
 */
extern "C" int ckv_backend_cuda(int device, ckv_backend **out)
{
	struct cuda_backend *cb;
	int count = 0, attr = 0;
	dev_scope dev;
	int rc;

	*out = NULL;
	if (cudaGetDeviceCount(&count) != cudaSuccess || count <= 0 || device < 0 ||
	    device >= count) {
		(void)cudaGetLastError(); /* leave no error behind for the engine's next check */
		return -ENODEV;
	}
	rc = dev.enter(device);
	if (rc)
		return rc;
	rc = CU(cudaDeviceGetAttribute(&attr, cudaDevAttrCanMapHostMemory, device));
	if (rc)
		return rc;
	if (!attr) {
		fprintf(stderr, "ckvgpu: cuda: device %d cannot map host memory\n", device);
		return -ENODEV;
	}
	cb = (struct cuda_backend *)calloc(1, sizeof(*cb));
	if (!cb)
		return -ENOMEM;
	cb->base.ops = &cuda_ops;
	cb->device = device;
	pthread_mutex_init(&cb->lock, NULL);
	pthread_mutex_init(&cb->rlock, NULL);
	pthread_cond_init(&cb->rcond, NULL);
	rc = CU(cudaDeviceGetAttribute(&cb->sms, cudaDevAttrMultiProcessorCount, device));
	if (rc)
		goto out_free;
	rc = CU(cudaDeviceGetAttribute(&attr, cudaDevAttrHostRegisterReadOnlySupported, device));
	if (rc)
		goto out_free;
	cb->ro_register = attr != 0;
	rc = CU(cudaDeviceGetAttribute(&attr, cudaDevAttrComputeCapabilityMajor, device));
	if (rc)
		goto out_free;
	cb->pdl = attr >= 9;
	/* kernel parameters past 4 KiB: CUDA 12.1+ in the driver and in the toolkit that built this */
	cb->inline_limit = GATHER_INLINE;
	if (CKV_BIG_PARAMS && cudaDriverGetVersion(&attr) == cudaSuccess && attr >= 12010)
		cb->inline_limit = GATHER_INLINE_MAX;
	cb->cfg.threads = 512;
	cb->cfg.unroll = 4;
	cb->cfg.blocks_per_sm = 0;
	cb->cfg.overlap = 1;
	rc = ring_resize(cb, RING_DEFAULT);
	if (rc)
		goto out_free;
	cb->cfg.ring_bytes = (uint32_t)cb->ring_size;
	*out = &cb->base;
	return 0;

out_free:
	ring_free(cb);
	pthread_mutex_destroy(&cb->lock);
	free(cb);
	return rc;
}
