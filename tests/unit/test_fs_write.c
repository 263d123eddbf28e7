/*
 * test_fs_write.c — an engine that writes a cache by path into a mounted
 * store: file by file into MNT/import/<name>/ with open / pwrite / close,
 * then waits for MNT/by-hash/<hash>/ and reads it back byte for byte.
 *
 * Needs a mount: CKV_TEST_MNT=MNT (tests/bats/fs_write_engine.bats mounts
 * one); exits 77 (skip) without it. Exit 0 pass, 1 fail.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ckv_format.h"

#define N_TOKENS 75 /* 5 chunks of 16, the last one partial */

static int fails;

#define CHECK(cond, ...)                                                      \
	do {                                                                  \
		if (!(cond)) {                                                \
			fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);       \
			fprintf(stderr, __VA_ARGS__);                         \
			fprintf(stderr, "\n");                                \
			fails++;                                              \
		}                                                             \
	} while (0)

/* Write buf to dir/name in pieces of `piece` bytes, as an engine streaming chunks would. */
static int write_file(const char *dir, const char *name, const void *buf, size_t len, size_t piece)
{
	char path[4096];
	size_t off = 0;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		return -1;
	}
	while (off < len) {
		size_t k = len - off < piece ? len - off : piece;
		ssize_t w = pwrite(fd, (const char *)buf + off, k, (off_t)off);
		if (w <= 0) {
			fprintf(stderr, "%s: write: %s\n", path, w < 0 ? strerror(errno) : "short");
			close(fd);
			return -1;
		}
		off += (size_t)w;
	}
	if (close(fd) < 0) {
		fprintf(stderr, "%s: close: %s\n", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* The whole of a file, malloc'ed; NULL on error. */
static char *read_file(const char *path, size_t *len)
{
	struct stat st;
	char *buf;
	ssize_t got;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || fstat(fd, &st) < 0) {
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	buf = malloc((size_t)st.st_size + 1);
	got = buf ? pread(fd, buf, (size_t)st.st_size, 0) : -1;
	close(fd);
	if (got != st.st_size) {
		free(buf);
		return NULL;
	}
	*len = (size_t)st.st_size;
	return buf;
}

static void expect_file(const char *dir, const char *name, const void *want, size_t len)
{
	char path[4096], *got;
	size_t glen = 0;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	got = read_file(path, &glen);
	CHECK(got, "%s: cannot read it back", path);
	if (got) {
		CHECK(glen == len && !memcmp(got, want, len), "%s: %zu bytes differ from the %zu written",
		      path, glen, len);
		free(got);
	}
}

int main(void)
{
	const char *mnt = getenv("CKV_TEST_MNT");
	ckv_geom g;
	ckv_manifest m;
	ckv_err e = { { 0 } };
	ckv_hash *chain;
	char dir[1200], pub[1200], hex[CKV_HASH_HEX + 1], *json = NULL, path[1300];
	uint8_t tokbuf[N_TOKENS * 4], *sums, **layers;
	uint32_t tokens[N_TOKENS], chunks;
	size_t jlen, lsize, slen;
	struct stat st;
	int waited;

	if (!mnt) {
		printf("CKV_TEST_MNT not set: needs a mounted store (tests/bats/fs_write_engine.bats)\n");
		return 77;
	}
	if (strlen(mnt) > 1000) {
		fprintf(stderr, "CKV_TEST_MNT: a shorter path, please\n");
		return 1;
	}

	/* A small geometry of its own: 3 layers, 2 kv heads, head_dim 64, fp16. */
	memset(&g, 0, sizeof(g));
	snprintf(g.model, sizeof(g.model), "test/c-engine");
	g.dtype = CKV_DTYPE_FP16;
	g.layers = 3;
	g.kv_heads = 2;
	g.head_dim = 64;
	g.chunk_tokens = 16;
	if (ckv_geom_init(&g, &e) < 0) {
		fprintf(stderr, "geometry: %s\n", e.msg);
		return 1;
	}
	chunks = ckv_chunks_for(N_TOKENS, g.chunk_tokens);
	lsize = (size_t)chunks * g.chunk_bytes;

	srand((unsigned)time(NULL) ^ (unsigned)getpid());
	for (uint32_t i = 0; i < N_TOKENS; i++) {
		tokens[i] = (uint32_t)rand() % 150000;
		tokbuf[4 * i] = (uint8_t)tokens[i];
		tokbuf[4 * i + 1] = (uint8_t)(tokens[i] >> 8);
		tokbuf[4 * i + 2] = (uint8_t)(tokens[i] >> 16);
		tokbuf[4 * i + 3] = (uint8_t)(tokens[i] >> 24);
	}
	chain = malloc(chunks * sizeof(*chain));
	layers = calloc(g.layers, sizeof(*layers));
	slen = CKV_SIDE_HEADER + (size_t)g.layers * chunks * 8;
	sums = malloc(slen);
	if (!chain || !layers || !sums)
		return 1;
	ckv_chain(&g, tokens, N_TOKENS, chain);

	/* Layer data: K then V per chunk, [head][slot][dim] fp16; unused slots and padding zero. */
	for (uint32_t l = 0; l < g.layers; l++) {
		layers[l] = calloc(1, lsize);
		if (!layers[l])
			return 1;
		for (uint32_t t = 0; t < N_TOKENS; t++) {
			uint32_t j = t / g.chunk_tokens, slot = t % g.chunk_tokens;
			for (uint32_t h = 0; h < g.kv_heads; h++)
				for (uint32_t d = 0; d < g.head_dim; d++) {
					size_t at = (size_t)j * g.chunk_bytes +
						    ((size_t)(h * g.chunk_tokens + slot) * g.head_dim + d) * 2;
					uint16_t k = (uint16_t)(0x3c00 | ((l * 7 + t + d) & 0x3ff));
					memcpy(layers[l] + at, &k, 2);
					k ^= 0x8000;
					memcpy(layers[l] + g.half_bytes + at, &k, 2);
				}
		}
	}
	{
		ckv_side_header sh = { .version = CKV_FORMAT_VERSION, .layers = g.layers, .chunks = chunks,
				       .per_chunk = 1 };
		memcpy(sh.magic, CKV_SUMS_MAGIC, 8);
		ckv_side_header_encode(&sh, sums);
		for (uint32_t l = 0; l < g.layers; l++)
			for (uint32_t j = 0; j < chunks; j++)
				ckv_sum_store(sums + CKV_SIDE_HEADER + ((size_t)l * chunks + j) * 8,
					      ckv_chunk_sum(layers[l] + (size_t)j * g.chunk_bytes, g.chunk_bytes));
	}
	memset(&m, 0, sizeof(m));
	m.geom = g;
	m.tokens = N_TOKENS;
	m.chunks = chunks;
	m.hash = chain[chunks - 1];
	ckv_hash_hex(&m.hash, hex);
	if (ckv_manifest_emit(&m, false, &json, &jlen) < 0)
		return 1;

	/* Write it by path: layers chunk by chunk, tokens, sums, manifest last. */
	snprintf(dir, sizeof(dir), "%s/import/c-engine-%d", mnt, (int)getpid());
	if (mkdir(dir, 0755) < 0) {
		fprintf(stderr, "%s: %s\n", dir, strerror(errno));
		return 1;
	}
	for (uint32_t l = 0; l < g.layers; l++) {
		char name[32];
		ckv_layer_name(l, name);
		if (write_file(dir, name, layers[l], lsize, g.chunk_bytes) < 0)
			return 1;
	}
	if (write_file(dir, "tokens.bin", tokbuf, sizeof(tokbuf), sizeof(tokbuf)) < 0 ||
	    write_file(dir, "sums.xxh3", sums, slen, slen) < 0 ||
	    write_file(dir, "manifest.json", json, jlen, jlen) < 0)
		return 1;

	/* Published under the hash of its tokens. */
	snprintf(pub, sizeof(pub), "%s/by-hash/%s", mnt, hex);
	snprintf(path, sizeof(path), "%s/manifest.json", pub);
	for (waited = 0; stat(path, &st) < 0 && waited < 400; waited++)
		usleep(50000);
	CHECK(waited < 400, "%s: not published after 20 s", pub);
	if (waited < 400) {
		expect_file(pub, "manifest.json", json, jlen);
		expect_file(pub, "tokens.bin", tokbuf, sizeof(tokbuf));
		expect_file(pub, "sums.xxh3", sums, slen);
		for (uint32_t l = 0; l < g.layers; l++) {
			char name[32];
			ckv_layer_name(l, name);
			expect_file(pub, name, layers[l], lsize);
		}
		/* read-only now */
		snprintf(path, sizeof(path), "%s/tokens.bin", pub);
		errno = 0;
		CHECK(open(path, O_WRONLY) < 0 && errno == EROFS, "%s: opened for writing (%s)", path,
		      strerror(errno));
		/* and the import area is empty again */
		snprintf(path, sizeof(path), "%s/manifest.json", dir);
		CHECK(stat(path, &st) < 0 && errno == ENOENT, "%s: still there", path);
	}
	rmdir(dir);

	for (uint32_t l = 0; l < g.layers; l++)
		free(layers[l]);
	free(layers);
	free(sums);
	free(chain);
	free(json);
	if (fails)
		return 1;
	printf("published %s\n", hex);
	return 0;
}
