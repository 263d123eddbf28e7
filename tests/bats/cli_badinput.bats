#!/usr/bin/env bats
# ckv import of bad input: each case is rejected (exit 1) with a message
# naming the file and the field, and the store is left exactly as it was.

load test_helper

setup_file() {
	local F=$BATS_FILE_TMPDIR a b c
	"$CKV" init "$F/store"
	a=$(gen_hash "$F/store" -m qwen2.5-0.5b -n 300 --seed 1)
	"$CKV" init "$F/src"
	b=$(gen_hash "$F/src" -m qwen2.5-0.5b -n 200 --seed 2)
	"$CKV" export "$F/src" "$b" "$F/good"
	# a child of the store's prefix: importing it shares 18 chunks
	gen_hash "$F/src" -m qwen2.5-0.5b -n 300 --seed 1 >/dev/null
	c=$(gen_hash "$F/src" --extends "$a" -n 100)
	"$CKV" export "$F/src" "$c" "$F/child"
	rm -rf "$F/src"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
	cp -a "$F/store" "$T/store"
	cp -a "$F/good" "$T/bad"
	B=$(jq -r .hash "$F/good/manifest.json")
	M=$T/bad/manifest.json
}

# rejected WANT...: importing $T/bad fails with exit 1; stderr names each WANT
# (file and field); the store is unchanged and still verifies.
rejected() {
	local before want
	before=$(store_snapshot "$T/store")
	run -1 --separate-stderr timeout 60 "$CKV" import "$T/store" "$T/bad"
	[ -z "$output" ] || fail "stdout: $output"
	assert_stderr_contains "ckv import: "
	for want in "$@"; do
		assert_stderr_contains "$want"
	done
	assert_equal "$(store_snapshot "$T/store")" "$before"
	staging_empty "$T/store"
	run -0 "$CKV" verify "$T/store"
}

@test "bad input: malformed JSON" {
	head -c 100 "$F/good/manifest.json" >"$M"
	rejected "$T/bad/manifest.json" "invalid JSON at line"
}

@test "bad input: manifest.json is not a JSON object" {
	echo '[1, 2, 3]' >"$M"
	rejected "$T/bad/manifest.json" "expected a JSON object"
}

@test "bad input: duplicate key" {
	sed -i 's/"tokens": 200,/"tokens": 200, "tokens": 200,/' "$M"
	grep -q '"tokens": 200, "tokens"' "$M"
	rejected "$T/bad/manifest.json" "duplicate"
}

@test "bad input: missing field \"tokens\"" {
	json_edit "$M" 'del(.tokens)'
	rejected "$T/bad/manifest.json" 'missing field "tokens"'
}

@test "bad input: missing field \"hash\"" {
	json_edit "$M" 'del(.hash)'
	rejected "$T/bad/manifest.json" 'missing field "hash"'
}

@test "bad input: mistyped field (\"layers\": \"24\")" {
	json_edit "$M" '.layers = "24"'
	rejected "$T/bad/manifest.json" 'field "layers": expected an integer'
}

@test "bad input: a float or negative integer field" {
	# (jq would print 16.0 as 16)
	sed -i 's/"chunk_tokens": 16,/"chunk_tokens": 16.0,/' "$M"
	grep -q '"chunk_tokens": 16.0,' "$M"
	rejected "$T/bad/manifest.json" 'field "chunk_tokens"'
	cp "$F/good/manifest.json" "$M"
	json_edit "$M" '.tokens = -200'
	rejected "$T/bad/manifest.json" 'field "tokens"'
}

@test "bad input: unknown dtype" {
	json_edit "$M" '.dtype = "int4"'
	rejected "$T/bad/manifest.json" 'field "dtype": unknown dtype "int4"'
}

@test "bad input: format version 2" {
	json_edit "$M" '.version = 2'
	rejected "$T/bad/manifest.json" 'field "version": format version 2'
}

@test "bad input: wrong format and layout strings" {
	json_edit "$M" '.format = "safetensors"'
	rejected "$T/bad/manifest.json" 'field "format": expected "ckv-prefix"'
	cp "$F/good/manifest.json" "$M"
	json_edit "$M" '.layout = "HKV"'
	rejected "$T/bad/manifest.json" 'field "layout": expected "KV-HCD"'
}

@test "bad input: zero layers" {
	json_edit "$M" '.layers = 0'
	rejected "$T/bad/manifest.json" "layers: expected 1..1024, got 0"
}

@test "bad input: kv_heads out of range" {
	json_edit "$M" '.kv_heads = 5000'
	rejected "$T/bad/manifest.json" '"kv_heads"' "5000"
}

@test "bad input: absurd kv_heads x head_dim (size math overflow) is caught" {
	# 1024 heads x 4096 tokens x 4096 dims x 4 bytes x 2: 2^37 bytes per chunk
	json_edit "$M" '.kv_heads = 1024 | .head_dim = 4096 | .chunk_tokens = 4096 | .dtype = "fp32" | del(.chunk_bytes, .chunks)'
	rejected "$T/bad/manifest.json" "chunk size 137438953472 bytes (kv_heads x chunk_tokens x head_dim) exceeds"
}

@test "bad input: a huge but valid shape that the files do not have" {
	# 256 MiB chunks are legal; the layer files then are the wrong size. Nothing that big is allocated.
	json_edit "$M" '.kv_heads = 1024 | .head_dim = 4096 | del(.chunk_bytes)'
	rejected "$T/bad/manifest.json" 'field "hash"'
}

@test "bad input: chunk_bytes or chunks that disagree with the shape" {
	json_edit "$M" '.chunk_bytes = 4096'
	rejected "$T/bad/manifest.json" 'field "chunk_bytes": 4096 does not match the shape (expected 8192)'
	cp "$F/good/manifest.json" "$M"
	json_edit "$M" '.chunks = 12'
	rejected "$T/bad/manifest.json" 'field "chunks": 12 does not match'
}

@test "bad input: zero tokens" {
	json_edit "$M" '.tokens = 0 | del(.chunks)'
	rejected "$T/bad/manifest.json" 'field "tokens"'
}

@test "bad input: tokens count mismatch (tokens.bin size vs \"tokens\")" {
	json_edit "$M" '.tokens = 199 | del(.chunks)'
	rejected "$T/bad/tokens.bin" '800 bytes, expected 796 (field "tokens" = 199'
}

@test "bad input: tokens.bin one byte short" {
	truncate -s -1 "$T/bad/tokens.bin"
	rejected "$T/bad/tokens.bin" "799 bytes, expected 800"
}

@test "bad input: hash mismatch (manifest \"hash\" vs tokens)" {
	json_edit "$M" '.hash = "0123456789abcdef0123456789abcdef"'
	rejected "$T/bad/manifest.json" 'field "hash" is 0123456789abcdef0123456789abcdef but tokens.bin hashes to '"$B"
}

@test "bad input: a changed token (tokens.bin no longer hashes to \"hash\")" {
	flip_byte "$T/bad/tokens.bin" 401
	rejected "$T/bad/manifest.json" 'field "hash" is '"$B"' but tokens.bin hashes to'
}

@test "bad input: hash not lowercase hex" {
	json_edit "$M" ".hash = \"${B^^}\""
	rejected "$T/bad/manifest.json" 'field "hash": expected 32 lowercase hex digits'
}

@test "bad input: directory-name mismatch (ckv import -H other hash)" {
	other=0123456789abcdef0123456789abcdef
	before=$(store_snapshot "$T/store")
	run -1 --separate-stderr "$CKV" import -H "$other" "$T/store" "$T/bad"
	assert_stderr_contains "$T/bad: directory is named $other but its tokens hash to $B"
	assert_equal "$(store_snapshot "$T/store")" "$before"
	staging_empty "$T/store"
}

@test "bad input: truncated layer file" {
	truncate -s -1 "$T/bad/layer_005.kv"
	rejected "$T/bad/layer_005.kv" "106495 bytes, expected 106496 (13 chunks of 8192 bytes): truncated"
}

@test "bad input: oversized layer file" {
	truncate -s +4096 "$T/bad/layer_023.kv"
	rejected "$T/bad/layer_023.kv" "110592 bytes, expected 106496" "too large"
}

@test "bad input: missing layer file" {
	rm "$T/bad/layer_017.kv"
	rejected "$T/bad/layer_017.kv" "No such file or directory"
}

@test "bad input: missing tokens.bin and missing manifest.json" {
	rm "$T/bad/tokens.bin"
	rejected "$T/bad/tokens.bin" "No such file or directory"
	cp "$F/good/tokens.bin" "$T/bad/"
	rm "$M"
	rejected "$T/bad/manifest.json" "No such file or directory"
}

@test "bad input: sums.xxh3 mismatch (one byte flipped in a layer file)" {
	flip_byte "$T/bad/layer_003.kv" $((7 * 8192 + 5))
	rejected "$T/bad/layer_003.kv" "chunk 7 does not match its checksum in sums.xxh3"
}

@test "bad input: sums.xxh3 mismatch in a chunk the store already holds" {
	# the child shares chunks 0..17 with the store's prefix: those are checked too
	rm -rf "$T/bad"
	cp -a "$F/child" "$T/bad"
	flip_byte "$T/bad/layer_009.kv" $((2 * 8192))
	rejected "$T/bad/layer_009.kv" "chunk 2 does not match its checksum in sums.xxh3"
}

@test "bad input: a flipped byte in sums.xxh3 itself" {
	flip_byte "$T/bad/sums.xxh3" $((32 + 8 * (24 * 13 - 1)))
	rejected "$T/bad/layer_023.kv" "chunk 12 does not match its checksum in sums.xxh3"
}

@test "bad input: bad sums.xxh3 header (magic)" {
	printf 'CKVSUMZ1' | dd of="$T/bad/sums.xxh3" conv=notrunc status=none
	rejected "$T/bad/sums.xxh3" 'bad magic, expected "CKVSUMS1"'
}

@test "bad input: bad sums.xxh3 header (version, layer count)" {
	printf '\002' | dd of="$T/bad/sums.xxh3" bs=1 seek=8 conv=notrunc status=none
	rejected "$T/bad/sums.xxh3" "format version 2"
	cp "$F/good/sums.xxh3" "$T/bad/"
	printf '\027' | dd of="$T/bad/sums.xxh3" bs=1 seek=12 conv=notrunc status=none
	rejected "$T/bad/sums.xxh3" "header says 23 layers x 13 chunks x 1, expected 24 x 13 x 1"
}

@test "bad input: sums.xxh3 of the wrong size" {
	truncate -s -8 "$T/bad/sums.xxh3"
	rejected "$T/bad/sums.xxh3" "2520 bytes, expected 2528"
}

@test "bad input: symlink as a layer file" {
	rm "$T/bad/layer_002.kv"
	ln -s layer_001.kv "$T/bad/layer_002.kv"
	rejected "$T/bad/layer_002.kv" "is a symbolic link; expected a regular file"
}

@test "bad input: symlink as manifest.json" {
	mv "$M" "$T/real.json"
	ln -s "$T/real.json" "$M"
	rejected "$T/bad/manifest.json" "symbolic link"
}

@test "bad input: a FIFO as tokens.bin (no hang)" {
	rm "$T/bad/tokens.bin"
	mkfifo "$T/bad/tokens.bin"
	rejected "$T/bad/tokens.bin" "not a regular file"
}

@test "bad input: a directory as tokens.bin" {
	rm "$T/bad/tokens.bin"
	mkdir "$T/bad/tokens.bin"
	rejected "$T/bad/tokens.bin" "not a regular file"
}

@test "bad input: an unexpected extra file" {
	echo hello >"$T/bad/notes.txt"
	rejected "$T/bad/notes.txt" "unexpected file (a 24-layer cache holds manifest.json, tokens.bin, sums.xxh3 and layer_000.kv..layer_023.kv)"
}

@test "bad input: a layer file past the layer count" {
	cp "$T/bad/layer_000.kv" "$T/bad/layer_024.kv"
	rejected "$T/bad/layer_024.kv" "unexpected file"
}

@test "bad input: unreadable layer file (a directory where the file should be)" {
	# Tests run as root, so chmod 000 would not stop a read: a directory named
	# like the file is what cannot be read as one.
	rm "$T/bad/layer_011.kv"
	mkdir "$T/bad/layer_011.kv"
	rejected "$T/bad/layer_011.kv" "not a regular file"
}

@test "bad input: the cache directory itself is a file" {
	rm -rf "$T/bad"
	echo x >"$T/bad"
	rejected "$T/bad" "Not a directory"
}
