/*
 * trace.h — attention-importance traces for the Re-Prefill benchmark
 * (tools/bench-reprefill.c): per layer and prefix token, the attention mass
 * that the new suffix puts on that token. docs/TRACES.md describes the file
 * format, the synthetic generator and its calibration.
 *
 * Three sources, one type:
 *   - a real trace file: raw float32 little-endian, row-major
 *     [window][layer][token] (ckv_trace_load);
 *   - the synthetic generator, calibrated to what the ContiguousKV and
 *     IMPRESS papers report (ckv_trace_synth);
 *   - a trace stretched to another layer count (ckv_trace_map_layers), so a
 *     12-layer real trace can drive a 28-layer model shape.
 * Every layer of a ckv_trace is normalised to sum 1.
 *
 * Errors: 0 or a negative errno; a message (naming the file and field) in
 * the caller's buffer when one is given.
 */
#ifndef CKV_TRACE_H
#define CKV_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct ckv_trace ckv_trace;

/*
 * Read window `window` of a trace file of `windows` x `layers` x `tokens`
 * floats. A zero dimension is taken from the file name's "-WxLxT.f32" tail
 * (e.g. codelm-12L-attn-8x12x3840.f32). The file size must match exactly.
 * Values must be finite and >= 0, and no layer may be all zero.
 */
int ckv_trace_load(const char *path, uint32_t windows, uint32_t layers, uint32_t tokens,
		   uint32_t window, ckv_trace **out, char *err, size_t errlen);
/* The dimensions a trace file holds (from its name and size). */
int ckv_trace_file_dims(const char *path, uint32_t *windows, uint32_t *layers, uint32_t *tokens,
			char *err, size_t errlen);

/*
 * The synthetic generator. Per chunk of `chunk` tokens a latent Gaussian
 * field z[l][j]: spatially an AR(1) along j (`spatial`), and across layers
 * an AR(1) in l (`layer_rho`), so that importance drifts slowly from layer
 * to layer. Chunk weight exp(sigma * z) (log-normal: the heavy tail); each
 * token's weight is its chunk's times exp(token_sigma * xi), xi a
 * per-token AR(1) in l as well. Token 0 gets `sink` of the mass (attention
 * sink); the last `recent_tokens` tokens get `recent`, rising linearly
 * toward the end; the rest is shared by the weights.
 */
typedef struct ckv_trace_synth_opts {
	uint32_t layers, tokens;
	uint32_t chunk;          /* tokens per chunk of the latent field (16) */
	uint64_t seed;
	double sigma;            /* log-normal scale of chunk weights */
	double spatial;          /* correlation of adjacent chunks' latents */
	double layer_rho;        /* correlation of a latent between adjacent layers */
	double token_sigma;      /* log-normal scale of tokens within a chunk */
	double sink;             /* mass on token 0 */
	double recent;           /* mass on the last recent_tokens tokens */
	uint32_t recent_tokens;
} ckv_trace_synth_opts;

/* The calibrated defaults (docs/TRACES.md); layers, tokens and seed left 0. */
void ckv_trace_synth_defaults(ckv_trace_synth_opts *o);
int ckv_trace_synth(const ckv_trace_synth_opts *o, ckv_trace **out);

/* A trace with `layers` layers: layer l is source layer floor(l * L_src / layers). */
int ckv_trace_map_layers(const ckv_trace *src, uint32_t layers, ckv_trace **out);

void ckv_trace_free(ckv_trace *t);
uint32_t ckv_trace_layers(const ckv_trace *t);
uint32_t ckv_trace_tokens(const ckv_trace *t);
/* Token masses of one layer: [tokens], summing to 1; owned by the trace. */
const float *ckv_trace_layer(const ckv_trace *t, uint32_t layer);

/* Chunk scores of one layer: out[j] = sum of the masses of chunk j's tokens. */
void ckv_trace_chunk_scores(const ckv_trace *t, uint32_t layer, uint32_t chunk, float *out);

/*
 * Indices of the k largest of v[0..n) into out (room for k), in descending
 * order of value, ties to the lower index.
 */
void ckv_trace_topk(const float *v, uint32_t n, uint32_t k, uint32_t *out);

/*
 * Statistics that characterise a set of traces, averaged over them (all of
 * one shape). Budgets: BUDGETS below. Layer distances: 1, 4 and `period`.
 */
#define CKV_TRACE_NB 4
extern const double ckv_trace_budgets[CKV_TRACE_NB]; /* 0.05, 0.10, 0.25, 0.50 */
typedef struct ckv_trace_stats {
	uint32_t traces, layers, tokens, period;
	/* top-k chunk sets of layers d apart: |A n B| / k and Jaccard; [dist][budget] */
	double overlap[3][CKV_TRACE_NB];
	double jaccard[3][CKV_TRACE_NB];
	/* the same between the first layers of adjacent periods, and averaged over
	 * every pair of layers inside one period */
	double overlap_periods[CKV_TRACE_NB];
	double overlap_in_period[CKV_TRACE_NB];
	double top_mass[CKV_TRACE_NB];   /* mass held by the top-k chunks */
	double sink;                     /* mass of chunk 0 */
	double recent;                   /* mass of the last chunk */
	/* top-k tokens: 16-token chunks and 64-token blocks that hold them,
	 * over the fewest possible (ceil(k/16) chunks, ceil(k/64) blocks) */
	double token_chunk_amp[CKV_TRACE_NB];
	double token_block_amp[CKV_TRACE_NB];
	double adjacent;                 /* P(chunk j+1 in top 10% | chunk j in top 10%) */
} ckv_trace_stats;
int ckv_trace_stats_compute(ckv_trace *const *t, uint32_t n, uint32_t chunk, uint32_t period,
			    ckv_trace_stats *st);
/* Print stats side by side (columns: one per stats set) as a markdown table. */
void ckv_trace_stats_print(const ckv_trace_stats *const *st, const char *const *names, uint32_t n,
			   FILE *f);

#endif
