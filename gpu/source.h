/*
 * source.h — where a loader's chunks come from (internal to libckvgpu).
 *
 * Two implementations with one contract:
 *   embedded (gpu/source_embedded.c): the store and a chunk engine in this
 *     process, chunks addressed through ckv_pview;
 *   remote (gpu/client.c): a ckvfs daemon over its control socket
 *     (docs/PROTOCOL.md); the daemon's arena is mapped read-only here.
 * In both, a fetched chunk is a range [off, off + len) of the arena, pinned
 * until released with the token the completion carried.
 */
#ifndef CKV_SOURCE_H
#define CKV_SOURCE_H

#include <stdbool.h>
#include <stdint.h>

#include "ckv_format.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckv_source ckv_source;

/* Completion of one chunk of a get: on a source thread; must not block. */
typedef void (*ckv_source_cb)(void *arg, uint32_t i, uint64_t off, uint64_t len, uint64_t token,
			      int rc);

enum ckv_source_part { CKV_SRC_KV = 0, CKV_SRC_K = 1, CKV_SRC_V = 2 };

/* Flags of get_ex. */
enum {
	/*
	 * Speculative: chunks not in the arena are read only while the source
	 * has no other read queued or in flight; until a read starts, cancel
	 * may withdraw it. A later get of the same chunk without the flag
	 * makes it an ordinary read.
	 */
	CKV_SRC_GET_IDLE = 1u << 0,
};

struct ckv_source_ops {
	/* Longest stored prefix of tokens under geometry g (ckv_store_match). */
	int (*match)(ckv_source *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		     ckv_hash *h, uint32_t *matched);
	/* Open a prefix; *m is malloc'ed (the exported manifest fields: geometry, tokens, chunks, hash). */
	int (*open)(ckv_source *s, const ckv_hash *h, ckv_manifest **m, uint32_t *pid);
	void (*close)(ckv_source *s, uint32_t pid);
	/*
	 * Bring chunks[0..n) of a layer (part) into the arena, pinned; cb once
	 * per chunk (i = index into chunks). Returns 0 once every request is
	 * queued (callbacks may already have run), or a negative errno and no
	 * callback at all.
	 */
	int (*get)(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		   const uint32_t *chunks, uint32_t n, ckv_source_cb cb, void *arg);
	void (*release)(ckv_source *s, const uint64_t *tokens, uint32_t n);
	/* Background read-ahead; no pins, no callbacks. */
	int (*prefetch)(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
			const uint32_t *chunks, uint32_t n);
	int (*score)(ckv_source *s, uint32_t pid, uint32_t layer, const uint32_t *chunks,
		     const float *scores, uint32_t n);
	/* Key digests of a layer: chunks * kv_heads * head_dim fp32 into out. */
	int (*digests)(ckv_source *s, uint32_t pid, uint32_t layer, float *out);
	void (*destroy)(ckv_source *s);
	/*
	 * Optional (NULL: not known). out[i] = 1 when chunks[i] of the layer
	 * (part) is in the arena now, else 0. For statistics only (arena hits
	 * versus disk reads, read amplification): the answer may be stale by the
	 * time a get for the same chunks runs.
	 */
	int (*resident)(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
			const uint32_t *chunks, uint32_t n, uint8_t *out);
	/*
	 * Optional (NULL: use get, and resident before it): get with flags
	 * (CKV_SRC_GET_*). Where resident is non-NULL it receives what
	 * resident() would say, from the same pass. *handle names the get for
	 * cancel; it is valid while a callback of the get is still to come.
	 */
	int (*get_ex)(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
		      const uint32_t *chunks, uint32_t n, unsigned flags, ckv_source_cb cb, void *arg,
		      uint8_t *resident, void **handle);
	/*
	 * Optional: withdraw requests idx[0..n) of a CKV_SRC_GET_IDLE get_ex
	 * (handle) whose reads have not started; chunks[k] is the chunk at
	 * idx[k] (same pid, layer and part). done[k] = 1 where withdrawn: that
	 * completion comes with -ECANCELED and the chunk is not read for it.
	 * The caller must keep the get's last callback from finishing during
	 * the call (hold the lock its callback takes). Does not block on I/O.
	 */
	int (*cancel)(ckv_source *s, void *handle, uint32_t pid, uint32_t layer,
		      enum ckv_source_part part, const uint32_t *chunks, const uint32_t *idx,
		      uint32_t n, uint8_t *done);
	/*
	 * Optional (NULL: digests under the caller's lock): digests of a layer
	 * from any thread without touching s->err: a failure message goes to
	 * err (errlen bytes).
	 */
	int (*digests_r)(ckv_source *s, uint32_t pid, uint32_t layer, float *out, char *err,
			 size_t errlen);
	/*
	 * Optional: a layer's digests will be read soon: start reading them
	 * (exactly them) in the background. Any thread; no error.
	 */
	void (*digests_hint)(ckv_source *s, uint32_t pid, uint32_t layer);
	/*
	 * Optional (NULL: this source has no key copies): the layer's low-bit
	 * key copy (keyq.bin of each extent's segment, docs/FORMAT.md) into
	 * *out, whose arrays the source allocates (ckv_keyq_free). Any thread;
	 * a failure message goes to err.
	 */
	int (*keyq_r)(ckv_source *s, uint32_t pid, uint32_t layer, struct ckv_keyq *out, char *err,
		      size_t errlen);
	/*
	 * Optional (NULL: get_ex is the only way): the warm path of a fetch.
	 * When every one of chunks[0..n) of the layer (part) is in the arena,
	 * pin them all in one pass and return 0 with off[i], len[i] and tok[i]
	 * set as a get's completions would (release the tokens as usual); when
	 * some chunk is not, or cannot be handed out this way, pin and count
	 * nothing and return 1. On the calling thread, no callback, never
	 * blocks on I/O. A negative errno on bad input, with nothing pinned:
	 * the caller falls back to get_ex, which reports it.
	 */
	int (*pin_resident)(ckv_source *s, uint32_t pid, uint32_t layer, enum ckv_source_part part,
			    const uint32_t *chunks, uint32_t n, uint64_t *off, uint64_t *len,
			    uint64_t *tok);
};


struct ckv_source {
	const struct ckv_source_ops *ops;
	void *arena;          /* mapped arena (read-only for remote) */
	uint64_t arena_size;
	bool arena_readonly;
	char err[512];        /* message of the last failure */
};

typedef struct ckv_source_opts {
	uint64_t arena_bytes; /* embedded */
	int policy;           /* embedded */
} ckv_source_opts;

int ckv_source_embedded(const char *store, const ckv_source_opts *o, ckv_source **out,
			ckv_err *e);
/* path: a mountpoint (its .ckv/ctl) or a socket path. */
int ckv_source_remote(const char *path, ckv_source **out, ckv_err *e);

#ifdef __cplusplus
}
#endif
#endif
