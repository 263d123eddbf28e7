/*
 * pview.c — prefix views: a prefix's extents mapped onto engine chunk files.
 */
#include "ckv_pview.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct pseg {
	uint32_t chunks;  /* chunks in the segment */
	uint64_t *sums;   /* [layers][chunks], loaded on first use */
	uint64_t *halves; /* [layers][chunks][2], loaded on first K/V use */
};

struct ckv_pview {
	atomic_uint refs;
	ckv_store *store;
	ckv_engine *engine;
	ckv_manifest *m;      /* owned */
	uint32_t *ext_start;  /* [nextents + 1]: first prefix chunk of each extent */
	pthread_mutex_t lock; /* protects segs[].sums, segs[].halves loading */
	struct pseg *segs;    /* [nextents] */
};

int ckv_pview_from(ckv_store *s, ckv_engine *e, ckv_manifest *m, ckv_pview **out, ckv_err *err)
{
	char hex[CKV_HASH_HEX + 1];
	ckv_pview *v;
	uint64_t acc = 0;

	v = calloc(1, sizeof(*v));
	if (!v) {
		ckv_manifest_free(m);
		free(m);
		return -ENOMEM;
	}
	atomic_init(&v->refs, 1);
	v->store = s;
	v->engine = e;
	v->m = m;
	pthread_mutex_init(&v->lock, NULL);
	ckv_hash_hex(&m->hash, hex);
	if (!m->nextents || !m->geom.layers || !m->geom.chunk_bytes) {
		ckv_pview_put(v);
		return ckv_errf(err, -EIO, "prefix %s: store record has no extents or no geometry", hex);
	}
	v->ext_start = calloc((size_t)m->nextents + 1, sizeof(*v->ext_start));
	v->segs = calloc(m->nextents, sizeof(*v->segs));
	if (!v->ext_start || !v->segs) {
		ckv_pview_put(v);
		return -ENOMEM;
	}
	for (uint32_t x = 0; x < m->nextents; x++) {
		v->ext_start[x] = (uint32_t)acc;
		acc += m->extents[x].count;
	}
	v->ext_start[m->nextents] = (uint32_t)acc;
	if (acc != m->chunks) {
		ckv_pview_put(v);
		return ckv_errf(err, -EIO, "prefix %s: extents cover %llu chunks, the manifest says %u",
				hex, (unsigned long long)acc, m->chunks);
	}
	*out = v;
	return 0;
}

int ckv_pview_open(ckv_store *s, ckv_engine *e, const ckv_hash *h, ckv_pview **out, ckv_err *err)
{
	ckv_manifest *m;
	int rc = ckv_store_get(s, h, &m, err);
	if (rc)
		return rc;
	return ckv_pview_from(s, e, m, out, err);
}

void ckv_pview_get(ckv_pview *v)
{
	atomic_fetch_add(&v->refs, 1);
}

void ckv_pview_put(ckv_pview *v)
{
	if (!v)
		return;
	assert(atomic_load(&v->refs) > 0);
	if (atomic_fetch_sub(&v->refs, 1) != 1)
		return;
	if (v->segs)
		for (uint32_t x = 0; x < v->m->nextents; x++) {
			free(v->segs[x].sums);
			free(v->segs[x].halves);
		}
	free(v->segs);
	free(v->ext_start);
	pthread_mutex_destroy(&v->lock);
	ckv_manifest_free(v->m);
	free(v->m);
	free(v);
}

const ckv_manifest *ckv_pview_manifest(const ckv_pview *v)
{
	return v->m;
}

uint32_t ckv_pview_extent(const ckv_pview *v, uint32_t j)
{
	uint32_t lo = 0, hi = v->m->nextents; /* ext_start[lo] <= j < ext_start[hi] */
	while (hi - lo > 1) {
		uint32_t mid = lo + (hi - lo) / 2;
		if (v->ext_start[mid] <= j)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

uint32_t ckv_pview_extent_start(const ckv_pview *v, uint32_t x)
{
	return v->ext_start[x];
}

/* Load the sums (and the half sums when halves) of every segment. v->lock held. */
static int load_sums(ckv_pview *v, bool halves)
{
	const ckv_manifest *m = v->m;
	for (uint32_t x = 0; x < m->nextents; x++) {
		struct pseg *sg = &v->segs[x];
		const ckv_extent *ex = &m->extents[x];
		uint32_t chunks = 0;
		ckv_err err = { { 0 } };
		int rc;

		if (!sg->sums) {
			rc = ckv_segment_sums(v->store, ex->segment, &m->geom, &sg->sums, &sg->chunks, &err);
			if (rc < 0)
				return rc;
			if ((uint64_t)ex->first + ex->count > sg->chunks) {
				free(sg->sums);
				sg->sums = NULL;
				return -EIO;
			}
		}
		if (halves && !sg->halves) {
			rc = ckv_segment_halves(v->store, ex->segment, &m->geom, &sg->halves, &chunks, &err);
			if (rc < 0)
				return rc;
			if (chunks != sg->chunks) {
				free(sg->halves);
				sg->halves = NULL;
				return -EIO;
			}
		}
	}
	return 0;
}

int ckv_pview_files_get(ckv_pview *v, uint32_t layer, enum ckv_pview_part part, ckv_efile **files)
{
	const ckv_manifest *m = v->m;
	const ckv_geom *g = &m->geom;
	uint32_t x = 0;
	int rc;

	if (layer >= g->layers || part > CKV_PV_V)
		return -EINVAL;
	memset(files, 0, sizeof(*files) * m->nextents);
	pthread_mutex_lock(&v->lock);
	rc = load_sums(v, part != CKV_PV_KV);
	for (; rc == 0 && x < m->nextents; x++) {
		const struct pseg *sg = &v->segs[x];
		const char *seg = m->extents[x].segment;
		char rel[PATH_MAX], key[128], lname[32];
		uint64_t *sums = NULL;
		int n;

		ckv_layer_name(layer, lname);
		ckv_segment_path(seg, rel, sizeof(rel));
		n = (int)strlen(rel);
		snprintf(rel + n, sizeof(rel) - (size_t)n, "/%s", lname);
		if (part == CKV_PV_KV) {
			snprintf(key, sizeof(key), "%s/%u", seg, layer);
			rc = ckv_engine_file_get(v->engine, ckv_store_dirfd(v->store), rel, key, g->chunk_bytes,
						 sg->chunks, sg->sums + (size_t)layer * sg->chunks, &files[x]);
			continue;
		}
		/* the K or V column of the halves table */
		sums = malloc(sizeof(*sums) * (sg->chunks ? sg->chunks : 1));
		if (!sums) {
			rc = -ENOMEM;
			break;
		}
		for (uint32_t i = 0; i < sg->chunks; i++)
			sums[i] = sg->halves[((size_t)layer * sg->chunks + i) * 2 + (part == CKV_PV_V)];
		snprintf(key, sizeof(key), "%s/%u/%c", seg, layer, part == CKV_PV_K ? 'k' : 'v');
		rc = ckv_engine_file_get_part(v->engine, ckv_store_dirfd(v->store), rel, key, g->half_bytes,
					      g->chunk_bytes, part == CKV_PV_V ? g->half_bytes : 0,
					      sg->chunks, sums, &files[x]);
		free(sums);
	}
	pthread_mutex_unlock(&v->lock);
	if (rc < 0)
		ckv_pview_files_put(v, files);
	return rc;
}

void ckv_pview_files_put(ckv_pview *v, ckv_efile **files)
{
	for (uint32_t x = 0; x < v->m->nextents; x++)
		if (files[x]) {
			ckv_engine_file_put(v->engine, files[x]);
			files[x] = NULL;
		}
}

ckv_chunk_ref ckv_pview_ref(const ckv_pview *v, ckv_efile *const *files, uint32_t j)
{
	uint32_t x = ckv_pview_extent(v, j);
	ckv_chunk_ref r = {
		.file = files[x],
		.chunk = v->m->extents[x].first + (j - v->ext_start[x]),
	};
	return r;
}

int ckv_pview_sums(ckv_pview *v, uint32_t layer, uint64_t *out)
{
	const ckv_manifest *m = v->m;
	int rc;
	if (layer >= m->geom.layers)
		return -EINVAL;
	pthread_mutex_lock(&v->lock);
	rc = load_sums(v, false);
	for (uint32_t x = 0; rc == 0 && x < m->nextents; x++) {
		const struct pseg *sg = &v->segs[x];
		memcpy(out + v->ext_start[x], sg->sums + (size_t)layer * sg->chunks + m->extents[x].first,
		       sizeof(*out) * m->extents[x].count);
	}
	pthread_mutex_unlock(&v->lock);
	return rc;
}

/* pread all of [off, off + len): 0, -errno, or -EIO at end of file. */
static int pread_all(int fd, void *buf, uint64_t len, uint64_t off)
{
	for (uint64_t done = 0; done < len;) {
		ssize_t got = pread(fd, (uint8_t *)buf + done, len - done, (off_t)(off + done));

		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return got < 0 ? -errno : -EIO;
		done += (uint64_t)got;
	}
	return 0;
}

int ckv_pview_side_open(ckv_pview *v, uint32_t x, const char *name, const char *magic,
			bool random, ckv_side_header *sh, char rel[PATH_MAX])
{
	const ckv_extent *ex = &v->m->extents[x];
	uint8_t hdr[CKV_SIDE_HEADER];
	ssize_t got;
	int fd, n;

	ckv_segment_path(ex->segment, rel, PATH_MAX);
	n = (int)strlen(rel);
	snprintf(rel + n, PATH_MAX - (size_t)n, "/%s", name);
	fd = openat(ckv_store_dirfd(v->store), rel, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (random)
		posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
	got = pread(fd, hdr, sizeof(hdr), 0);
	if (got != (ssize_t)sizeof(hdr) || ckv_side_header_decode(sh, hdr, magic, rel, NULL) < 0 ||
	    sh->layers != v->m->geom.layers || (uint64_t)ex->first + ex->count > sh->chunks) {
		int rc = got < 0 ? -errno : -EIO;

		close(fd);
		return rc;
	}
	return fd;
}

int ckv_pview_keyq(ckv_pview *v, uint32_t layer, uint32_t first, uint32_t count,
		   struct ckv_keyq *out, char *err, size_t errlen)
{
	const ckv_manifest *m = v->m;
	uint64_t HD = (uint64_t)m->geom.kv_heads * m->geom.head_dim;
	uint32_t np = 0, end = first + count;
	int rc = 0;

	memset(out, 0, sizeof(*out));
	err[0] = 0;
	if (layer >= m->geom.layers || count == 0 || (uint64_t)first + count > m->chunks) {
		snprintf(err, errlen, "layer %u chunks %u..%llu: the prefix has %u layers of %u chunks",
			 layer, first, (unsigned long long)first + count, m->geom.layers, m->chunks);
		return -EINVAL;
	}
	out->first = calloc(m->nextents + 1, sizeof(*out->first));
	out->scales = malloc(sizeof(*out->scales) * 2 * HD * (m->nextents ? m->nextents : 1));
	if (!out->first || !out->scales) {
		ckv_keyq_free(out);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	for (uint32_t x = 0; x < m->nextents && rc == 0; x++) {
		const ckv_extent *ex = &m->extents[x];
		uint32_t s0 = v->ext_start[x], s1 = s0 + ex->count;
		uint32_t lo = first > s0 ? first : s0, hi = end < s1 ? end : s1;
		char rel[PATH_MAX];
		uint8_t *raw;
		ckv_side_header sh;
		uint64_t base;
		int fd;

		if (lo >= hi)
			continue;
		fd = ckv_pview_side_open(v, x, "keyq.bin", CKV_KEYQ_MAGIC, false, &sh, rel);
		if (fd < 0 && fd != -EIO) {
			rc = fd;
			snprintf(err, errlen, "%s: %s%s", rel, strerror(-fd),
				 fd == -ENOENT ? " (a segment written before key copies: `ckv reindex STORE` writes them)" : "");
			break;
		}
		if (fd < 0 || sh.reserved < 1 || sh.reserved > 4 || (np && sh.reserved != out->bits) ||
		    sh.per_chunk != ckv_keyq_chunk_bytes(&m->geom, (unsigned)sh.reserved)) {
			if (fd >= 0)
				close(fd);
			snprintf(err, errlen, "%s: not a key copy of this prefix's geometry%s", rel,
				 np ? " (or of another width than its other segments')" : "");
			rc = -EIO;
			break;
		}
		if (!np) {
			out->bits = (unsigned)sh.reserved;
			out->per = sh.per_chunk;
			out->codes = malloc(out->per * count);
			if (!out->codes) {
				close(fd);
				snprintf(err, errlen, "out of memory");
				rc = -ENOMEM;
				break;
			}
		}
		base = CKV_SIDE_HEADER + (uint64_t)layer * ckv_keyq_layer_bytes(&m->geom, out->bits, sh.chunks);
		raw = (uint8_t *)(out->scales + 2 * HD * np);
		rc = pread_all(fd, raw, 4 * HD, base);
		if (rc == 0)
			rc = pread_all(fd, out->codes + (uint64_t)(lo - first) * out->per, (uint64_t)(hi - lo) * out->per,
				       base + 4 * HD + (uint64_t)(ex->first + lo - s0) * out->per);
		close(fd);
		if (rc < 0) {
			snprintf(err, errlen, "%s: %s", rel, strerror(-rc));
			break;
		}
		for (uint64_t i = 0; i < 2 * HD; i++) { /* little-endian on disk; in place */
			uint16_t h = (uint16_t)(raw[2 * i] | raw[2 * i + 1] << 8);

			out->scales[2 * HD * np + i] = h;
		}
		out->first[np++] = lo;
		out->first[np] = hi;
	}
	out->nparts = np;
	if (rc < 0)
		ckv_keyq_free(out);
	return rc;
}

int ckv_pview_digests_range(ckv_pview *v, uint32_t layer, uint32_t first, uint32_t count,
			    float *out)
{
	const ckv_manifest *m = v->m;
	size_t per = (size_t)m->geom.kv_heads * m->geom.head_dim;
	uint64_t end = (uint64_t)first + count;
	int rc = 0;

	if (layer >= m->geom.layers || end > m->chunks)
		return -EINVAL;
	for (uint32_t x = 0; x < m->nextents && rc == 0; x++) {
		const ckv_extent *ex = &m->extents[x];
		uint64_t a = v->ext_start[x] > first ? v->ext_start[x] : first;
		uint64_t b = v->ext_start[x + 1] < end ? v->ext_start[x + 1] : end;
		char rel[PATH_MAX];
		ckv_side_header sh;
		off_t off;
		size_t len;
		ssize_t got;
		int fd;

		if (a >= b)
			continue; /* the extent is outside the range */
		fd = ckv_pview_side_open(v, x, "digest.bin", CKV_DIGEST_MAGIC, false, &sh, rel);
		if (fd < 0)
			return fd;
		if (sh.per_chunk != per) {
			close(fd);
			return -EIO;
		}
		len = sizeof(float) * per * (size_t)(b - a);
		off = CKV_SIDE_HEADER + (off_t)(((uint64_t)layer * sh.chunks + ex->first +
						 (a - v->ext_start[x])) * per * sizeof(float));
		got = pread(fd, out + (size_t)(a - first) * per, len, off);
		if (got != (ssize_t)len)
			rc = -EIO;
		close(fd);
	}
	return rc;
}

int ckv_pview_digests(ckv_pview *v, uint32_t layer, float *out)
{
	return ckv_pview_digests_range(v, layer, 0, v->m->chunks, out);
}
