/*
 * ckv_pview.h — a prefix opened for chunk access: maps (layer, chunk, part)
 * of a prefix onto the engine's chunk files (one per segment and layer).
 * Shared by the FUSE front end, the control-socket server and the embedded
 * loader, so all three name a physical chunk the same way (retention keys
 * "<segment>/<layer>", "<segment>/<layer>/k", "<segment>/<layer>/v").
 *
 * A view owns a copy of the prefix's store record: a prefix removed from the
 * store stays readable through views opened before (its segments' files are
 * held open by the engine while registered, and gc never deletes a segment
 * another prefix references).
 *
 * Reference counted; thread-safe.
 */
#ifndef CKV_PVIEW_H
#define CKV_PVIEW_H

#include <limits.h>
#include <stdbool.h>

#include "ckv_engine.h"
#include "ckv_store.h"

typedef struct ckv_pview ckv_pview;

enum ckv_pview_part {
	CKV_PV_KV = 0, /* whole chunk (chunk_bytes) */
	CKV_PV_K = 1,  /* K half (half_bytes) */
	CKV_PV_V = 2,  /* V half */
};

/* Open prefix h; takes the store's record. -ENOENT when not stored. */
int ckv_pview_open(ckv_store *s, ckv_engine *e, const ckv_hash *h, ckv_pview **out, ckv_err *err);
/* Build from a record the caller owns (*m is taken; freed with the view). */
int ckv_pview_from(ckv_store *s, ckv_engine *e, ckv_manifest *m, ckv_pview **out, ckv_err *err);
void ckv_pview_get(ckv_pview *v);
void ckv_pview_put(ckv_pview *v);

/* The record; owned by the view, valid while it is held. */
const ckv_manifest *ckv_pview_manifest(const ckv_pview *v);

/*
 * Engine files of one layer and part (a reference each, one per extent):
 * files[] has ckv_pview_manifest(v)->nextents entries and is released with
 * ckv_pview_files_put. Sums are loaded on first use.
 */
int ckv_pview_files_get(ckv_pview *v, uint32_t layer, enum ckv_pview_part part, ckv_efile **files);
void ckv_pview_files_put(ckv_pview *v, ckv_efile **files);

/* Engine reference of prefix chunk j, given the files of its layer and part. */
ckv_chunk_ref ckv_pview_ref(const ckv_pview *v, ckv_efile *const *files, uint32_t j);

/* Extent index holding prefix chunk j, and the first prefix chunk of extent x. */
uint32_t ckv_pview_extent(const ckv_pview *v, uint32_t j);
uint32_t ckv_pview_extent_start(const ckv_pview *v, uint32_t x);

/*
 * Key digests of one layer: out receives chunks * kv_heads * head_dim fp32
 * (per chunk and kv head the mean key), read from the segments' digest.bin.
 */
int ckv_pview_digests(ckv_pview *v, uint32_t layer, float *out);
/* The same for chunks [first, first + count) only: count * kv_heads * head_dim fp32. */
int ckv_pview_digests_range(ckv_pview *v, uint32_t layer, uint32_t first, uint32_t count,
			    float *out);

/*
 * Open extent x's segment side file `name` (digest.bin, keyq.bin, ...) and
 * read its header: magic, version, layers, and that it covers the extent's
 * chunks are checked (the caller checks per_chunk and reserved). random:
 * POSIX_FADV_RANDOM before the first read (no kernel read-ahead). The fd,
 * or -errno (-EIO for a header that does not fit); rel receives the file's
 * path in the store.
 */
int ckv_pview_side_open(ckv_pview *v, uint32_t x, const char *name, const char *magic,
			bool random, ckv_side_header *sh, char rel[PATH_MAX]);

/*
 * Key copy (keyq.bin, docs/FORMAT.md) of chunks [first, first + count) of
 * one layer: one part per extent they touch; *out's arrays are malloc'ed
 * (ckv_keyq_free). 0 or -errno with a message in err.
 */
int ckv_pview_keyq(ckv_pview *v, uint32_t layer, uint32_t first, uint32_t count,
		   struct ckv_keyq *out, char *err, size_t errlen);

/* Per-chunk sums of one layer of the prefix ([chunks], host order). */
int ckv_pview_sums(ckv_pview *v, uint32_t layer, uint64_t *out);

#endif
