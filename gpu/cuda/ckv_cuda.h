/*
 * ckv_cuda.h — CUDA entry points of libckvgpu for inference engines, beside
 * the backend interface (backend.h). Callable from C and C++; built only
 * when nvcc exists (CKV_HAVE_CUDA).
 *
 * Every function takes a backend made by ckv_backend_cuda() and returns 0
 * or a negative errno: -EINVAL for bad arguments (nothing was enqueued),
 * -ENOMEM, -ENODEV or -EIO for a CUDA failure (its cudaGetErrorString is
 * logged to stderr). Work is enqueued on `stream` (a cudaStream_t, NULL for
 * the default stream) and is complete only in that stream's order; host
 * arrays passed in may be reused as soon as the call returns.
 */
#ifndef CKV_CUDA_H
#define CKV_CUDA_H

#include <stdint.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Geometry of a scatter into a paged KV cache in vLLM's layout: separate K
 * and V caches, each [num_blocks][block_size][kv_heads][head_dim] of
 * elem_bytes-sized elements; token slot s lives in block s / block_size at
 * offset s % block_size.
 */
typedef struct ckv_paged_geom {
	uint32_t kv_heads;      /* heads in a chunk and in the cache (a TP rank's slice: both) */
	uint32_t head_dim;
	uint32_t chunk_tokens;  /* c, at most 4096 */
	uint32_t elem_bytes;    /* 1 (fp8), 2 (bf16, fp16) or 4 (fp32) */
	uint32_t block_size;    /* tokens per cache block */
	uint64_t num_blocks;    /* blocks in each cache: slots >= num_blocks * block_size are skipped */
	/*
	 * Bytes from one block to the next in each cache; 0 for the dense
	 * layout (block_size * kv_heads * head_dim * elem_bytes). FlashInfer's
	 * [num_blocks][2][block_size][kv_heads][head_dim] cache is this with
	 * twice the dense stride and v_cache = k_cache + one dense block.
	 */
	uint64_t block_stride;
} ckv_paged_geom;

/*
 * Scatter the tokens of n KV-HCD chunks (docs/FORMAT.md: K then V, each
 * [kv_heads][chunk_tokens][head_dim]) into a paged K and V cache, head-major
 * to token-major, in one kernel launch.
 *
 * Chunk i starts at src_base + src[i]; src_base NULL means the backend's
 * registered arena (src[i] is then an arena offset, checked against its
 * size), otherwise any device-accessible memory (say a ckv_layer_view's kv,
 * with src[i] = i * chunk_bytes). src[] is host memory.
 * slot_mapping is device memory, n * chunk_tokens int64 slots: token t of
 * chunk i goes to slot_mapping[i * chunk_tokens + t]; a negative slot (vLLM
 * pads with -1; use it for the unused slots of a partial last chunk) or one
 * past the cache is skipped. Sources, caches and block_stride need only the
 * alignment of one element; the kernel moves the widest vectors (up to 16
 * bytes) that the row size (head_dim * elem_bytes) and all of them allow.
 */
int ckv_cuda_scatter_paged(ckv_backend *b, const void *src_base, const uint64_t *src, uint32_t n,
			   const ckv_paged_geom *g, const int64_t *slot_mapping, void *k_cache,
			   void *v_cache, void *stream);

/*
 * Shape of the gather kernel. The defaults are what tools/bench-gather
 * measured best (docs/BENCHMARKS.md); the bench sweeps them, tests shrink
 * the descriptor ring (and inline_max) to force its reuse.
 */
typedef struct ckv_cuda_gather_cfg {
	uint32_t threads;       /* per block: 64 .. 1024, a multiple of 32 */
	uint32_t unroll;        /* 16-byte loads in flight per thread: 1, 2, 4 or 8 */
	uint32_t blocks_per_sm; /* 0: one block per copy; k: a persistent grid of k blocks per SM */
	uint32_t ring_bytes;    /* descriptor ring, >= 4096 (grows for a larger gather) */
	/*
	 * 1: a gather whose descriptors fit the kernel parameters may start
	 * while the previous kernel of its stream ends (programmatic dependent
	 * launch, compute capability 9.0+): its first arena loads are issued
	 * early, every store waits for that kernel. 0: ordinary launches.
	 * Gathers also let the next kernel launch early: a caller's kernel
	 * launched with programmatic stream serialization right after a gather
	 * must call cudaGridDependencySynchronize() before it reads the chunks,
	 * as CUDA asks of every such kernel; ordinary launches are unaffected.
	 */
	uint32_t overlap;
	/*
	 * Most copies a gather passes in its kernel parameters (the rest go
	 * through the descriptor ring, by a copy and an ordinary launch); 0:
	 * as many as the driver takes (2044 with CUDA 12.1+, else 128). Tests
	 * lower it to exercise the ring.
	 */
	uint32_t inline_max;
} ckv_cuda_gather_cfg;

void ckv_cuda_get_gather_cfg(ckv_backend *b, ckv_cuda_gather_cfg *cfg);
/* Waits for every gather in flight when ring_bytes changes. */
int ckv_cuda_set_gather_cfg(ckv_backend *b, const ckv_cuda_gather_cfg *cfg);

#ifdef __cplusplus
}
#endif
#endif
