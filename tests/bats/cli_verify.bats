#!/usr/bin/env bats
# ckv verify finds damaged segment files; ckv reindex rebuilds the index
# from the files alone.

load test_helper

setup_file() {
	local F=$BATS_FILE_TMPDIR p
	"$CKV" init "$F/s"
	p=$(gen_hash "$F/s" -m qwen2.5-0.5b -n 500 --seed 1)
	echo "$p" >"$F/p.hash"
	gen_hash "$F/s" --extends "$p" -n 200 >"$F/c.hash"
	gen_hash "$F/s" -m qwen2.5-7b -n 40 --seed 2 >"$F/q.hash"
	gen_hash "$F/s" --model-id test/r --layers 2 --kv-heads 1 --head-dim 32 --dtype fp16 -n 77 >"$F/r.hash"
	"$CKV" export "$F/s" "$(cat "$F/c.hash")" "$F/c.export"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
	cp -a "$F/s" "$T/s"
	S=$T/s
	P=$(cat "$F/p.hash")
	C=$(cat "$F/c.hash")
	Q=$(cat "$F/q.hash")
	R=$(cat "$F/r.hash")
	PSEG=$S/seg/${P:0:2}/$P-0
}

@test "verify passes on a good store, for all prefixes and for each" {
	run -0 --separate-stderr "$CKV" verify "$S"
	assert_equal "$output" ok
	assert_stderr_empty
	for h in "$P" "$C" "$Q" "$R"; do
		run -0 "$CKV" verify "$S" "$h"
		assert_equal "$output" ok
	done
}

@test "verify: one flipped byte in a segment layer file is reported with file, layer and chunk" {
	f=$(ls "$S"/seg/*/*/layer_003.kv | grep "/$P-0/")
	[ "$f" = "$PSEG/layer_003.kv" ]
	flip_byte "$f" $((5 * 8192 + 100))
	run -1 --separate-stderr "$CKV" verify "$S"
	assert_stderr_contains "ckv verify: $PSEG/layer_003.kv: layer 3 chunk 5: checksum mismatch"
	[ "$(grep -c 'checksum mismatch' <<<"$stderr")" -eq 1 ] || fail "reported more than once: $stderr"
	assert_equal "$output" "1 problem found"
	# both prefixes that read the segment fail; the others pass
	run -1 --separate-stderr "$CKV" verify "$S" "$P"
	assert_stderr_contains "layer_003.kv: layer 3 chunk 5"
	run -1 --separate-stderr "$CKV" verify "$S" "$C"
	assert_stderr_contains "layer_003.kv: layer 3 chunk 5"
	run -0 "$CKV" verify "$S" "$Q"
	run -0 "$CKV" verify "$S" "$R"
	# export refuses to hand out the corrupt chunk
	run -1 --separate-stderr "$CKV" export "$S" "$C" "$T/out"
	assert_stderr_contains "layer_003.kv: chunk 5 (layer 3, prefix chunk 5) fails its checksum"
	[ ! -e "$T/out/manifest.json" ]
	# flipping it back heals it
	flip_byte "$f" $((5 * 8192 + 100))
	run -0 "$CKV" verify "$S"
}

@test "verify: a flipped byte in the last chunk of the last layer" {
	f=$PSEG/layer_023.kv
	flip_byte "$f" $((32 * 8192 - 1))
	run -1 --separate-stderr "$CKV" verify "$S" "$P"
	assert_stderr_contains "$f: layer 23 chunk 31: checksum mismatch"
}

@test "verify: a truncated segment layer file is reported" {
	truncate -s $((20 * 8192)) "$PSEG/layer_003.kv"
	run -1 --separate-stderr "$CKV" verify "$S"
	assert_stderr_contains "ckv verify: $PSEG/layer_003.kv: layer 3: 163840 bytes, expected 262144"
	assert_equal "$output" "1 problem found"
	run -1 "$CKV" export "$S" "$P" "$T/out"
}

@test "verify: a grown segment layer file is reported" {
	truncate -s $((33 * 8192)) "$PSEG/layer_010.kv"
	run -1 --separate-stderr "$CKV" verify "$S" "$P"
	assert_stderr_contains "$PSEG/layer_010.kv: layer 10: 270336 bytes, expected 262144"
}

@test "verify: a missing segment layer file is reported" {
	rm -f "$PSEG/layer_007.kv"
	run -1 --separate-stderr "$CKV" verify "$S"
	assert_stderr_contains "$PSEG/layer_007.kv: No such file or directory"
}

@test "verify: damaged sums.xxh3 and tokens.bin are reported; several problems counted" {
	flip_byte "$PSEG/sums.xxh3" 2
	run -1 --separate-stderr "$CKV" verify "$S" "$P"
	assert_stderr_contains "sums.xxh3: bad magic"
	flip_byte "$PSEG/sums.xxh3" 2
	run -0 "$CKV" verify "$S" "$P"
	flip_byte "$PSEG/tokens.bin" 40
	flip_byte "$PSEG/layer_000.kv" 0
	run -1 --separate-stderr "$CKV" verify "$S"
	assert_stderr_contains "prefix $P: its segments' tokens hash to a different prefix"
	assert_stderr_contains "prefix $C: its segments' tokens hash to a different prefix"
	assert_stderr_contains "$PSEG/layer_000.kv: layer 0 chunk 0: checksum mismatch"
	assert_equal "$output" "3 problems found"
}

# observe STORE: everything the index answers, as text
observe() {
	local h
	"$CKV" ls "$1"
	"$CKV" ls "$1" --json
	"$CKV" ls "$1" --model qwen2.5-7b
	for h in "$P" "$C" "$Q" "$R"; do
		"$CKV" stat "$1" "$h"
		"$CKV" stat "$1" "$h" --json
	done
	"$CKV" match "$1" -m qwen2.5-0.5b --tokens "$F/c.export/tokens.bin"
	head -c 2040 "$F/c.export/tokens.bin" >"$T/q510"
	"$CKV" match "$1" -m qwen2.5-0.5b --tokens "$T/q510"
	"$CKV" verify "$1"
}

@test "reindex after rm -rf index/*: ls, stat, match answer exactly as before" {
	before=$(observe "$S")
	rm -rf "$S"/index/*
	run -0 --separate-stderr "$CKV" reindex "$S"
	assert_equal "$output" "indexed 4 prefixes"
	assert_stderr_empty
	assert_equal "$(observe "$S")" "$before"
	# the rebuilt reference counts are right: gc keeps what is shared
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 0 segments"
	run -0 "$CKV" rm "$S" "$P"
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 0 segments"
	run -0 "$CKV" rm "$S" "$C"
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 2 segments"
	[ "$(seg_count "$S")" -eq 2 ]
	run -0 "$CKV" verify "$S"
}

@test "reindex of a corrupt index: ls, stat, match answer exactly as before" {
	before=$(observe "$S")
	head -c 65536 /dev/urandom >"$S/index/data.mdb"
	run -1 --separate-stderr "$CKV" ls "$S"
	assert_stderr_contains "$S/index"
	run -0 --separate-stderr "$CKV" reindex "$S"
	assert_equal "$output" "indexed 4 prefixes"
	assert_equal "$(observe "$S")" "$before"
}

@test "reindex of an index with stale entries drops what the files do not say" {
	before=$(observe "$S")
	"$CKV" gen -q "$S" -m qwen2.5-0.5b -n 64 --seed 99 >"$T/x.hash"
	X=$(cat "$T/x.hash")
	# the files of X vanish behind the index's back
	rm -f "$S/prefix/${X:0:2}/$X.json"
	run -0 "$CKV" reindex "$S"
	assert_equal "$output" "indexed 4 prefixes"
	run -0 "$CKV" ls "$S"
	refute_output_contains "$X"
	# its orphaned segment goes with the next gc
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 1 segments"
	[ ! -e "$S/seg/${X:0:2}/$X-0" ]
	assert_equal "$(observe "$S")" "$before"
}

@test "reindex skips a record whose segments are gone, and a garbage record" {
	rm -rf "$S/seg/${Q:0:2}/$Q-0"
	mkdir -p "$S/prefix/ab"
	echo '{"format": "ckv-prefix"' >"$S/prefix/ab/abababababababababababababababab.json"
	run -0 "$CKV" reindex "$S"
	assert_equal "$output" "indexed 3 prefixes"
	run -0 "$CKV" ls "$S"
	refute_output_contains "$Q"
	run -0 "$CKV" verify "$S"
}
