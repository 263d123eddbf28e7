#!/usr/bin/env bats
# Chunk dedup: an extension of a stored prefix stores only its new chunks;
# segments are reference-counted; gc frees exactly what nothing references.

load test_helper

CB=8192 # qwen2.5-0.5b chunk_bytes
L=24

setup() {
	T=$BATS_TEST_TMPDIR
	S=$T/s
	"$CKV" init "$S"
	# parent: 1000 tokens = 62 full chunks + 8 tokens (63 chunks)
	P=$(gen_hash "$S" -m qwen2.5-0.5b -n 1000 --seed 5)
}

segbytes() {
	du -sb "$1/seg" | cut -f1
}

@test "an --extends child grows seg/ by about its new chunks only" {
	before=$(segbytes "$S")
	run -0 "$CKV" gen "$S" --extends "$P" -n 200
	# 1200 tokens = 75 chunks; the 62 full chunks of the parent are shared
	assert_equal "${lines[1]%%  written*}" "new chunks 13  shared chunks 62"
	C=${lines[2]}
	after=$(segbytes "$S")
	growth=$((after - before))
	new_layer=$((13 * CB * L))
	# side files of the new segment: per chunk and layer a checksum (8 B), K/V half
	# checksums (16 B), a digest (kv_heads*head_dim*4 = 512 B) and a 3-bit key copy
	# (kv_heads*16*head_dim*3/8 = 768 B), per layer the copy's scales (512 B);
	# tokens.bin (208 tokens), headers, the directories: 32 KiB of slack
	bound=$((new_layer + 13 * L * (8 + 16 + 512 + 768) + 512 * L + 32768))
	echo "growth $growth, layer bytes $new_layer, bound $bound, parent $before"
	[ "$growth" -ge "$new_layer" ]
	[ "$growth" -le "$bound" ]
	[ "$growth" -lt $((before / 2)) ]
	[ "$(seg_count "$S")" -eq 2 ]
	# stat: the child reads 75 chunks, 62 of them in the parent's (shared) segment
	run -0 "$CKV" stat "$S" "$C" --json
	assert_equal "$(jq -c '[.chunks, .bytes, .bytes_shared]' <<<"$output")" \
		"[75,$((75 * CB * L)),$((62 * CB * L))]"
	assert_equal "$(jq -c '[.extents[] | [.segment, .first, .count]]' <<<"$output")" \
		"[[\"$P-0\",0,62],[\"$C-62\",0,13]]"
	run -0 "$CKV" stat "$S" "$C"
	assert_output_contains "shared      11.6 MiB ($((62 * CB * L))) in segments other prefixes also use"
	assert_output_contains "extents     2"
	run -0 "$CKV" verify "$S"
}

@test "importing an exported child into a store holding the parent writes only the new chunks" {
	"$CKV" init "$T/src"
	p2=$(gen_hash "$T/src" -m qwen2.5-0.5b -n 1000 --seed 5)
	assert_equal "$p2" "$P"
	C=$(gen_hash "$T/src" --extends "$P" -n 200)
	"$CKV" export "$T/src" "$C" "$T/child"
	before=$(segbytes "$S")
	run -0 --separate-stderr "$CKV" import "$S" "$T/child"
	assert_equal "$output" "new chunks 13  shared chunks 62  written 2.4 MiB
$C"
	growth=$(($(segbytes "$S") - before))
	[ "$growth" -lt $((13 * CB * L + 13 * L * (8 + 16 + 512 + 768) + 512 * L + 32768)) ] || fail "growth $growth"
	"$CKV" export "$S" "$C" "$T/back"
	assert_same_dir "$T/child" "$T/back"
}

@test "a chain of extensions grows linearly, not quadratically" {
	h=$P
	for i in 1 2 3 4 5; do
		h=$(gen_hash "$S" --extends "$h" -n 160 --seed $((20 + i)))
	done
	run -0 "$CKV" stat "$S" "$h" --json
	[ "$(jq .tokens <<<"$output")" -eq 1800 ]
	[ "$(jq '.extents | length' <<<"$output")" -eq 6 ]
	# stored layer bytes: 63 (parent) + 5 x 11 chunks (10 new full chunks + the partial one
	# re-stored each turn), not the sum of all prefixes' sizes
	layer_bytes=0
	for f in "$S"/seg/*/*/layer_000.kv; do
		layer_bytes=$((layer_bytes + $(stat -c %s "$f")))
	done
	assert_equal "$layer_bytes" $(((63 + 5 * 11) * CB))
	run -0 "$CKV" verify "$S"
}

@test "rm of the parent keeps the child whole; gc frees only what nothing references" {
	C=$(gen_hash "$S" --extends "$P" -n 200)
	"$CKV" export "$S" "$C" "$T/c1"
	"$CKV" export "$S" "$P" "$T/p1"
	run -0 "$CKV" rm "$S" "$P"
	run -0 "$CKV" ls "$S"
	[ "${#lines[@]}" -eq 1 ]
	assert_output_contains "$C"
	"$CKV" export "$S" "$C" "$T/c2"
	assert_same_dir "$T/c1" "$T/c2"
	run -0 "$CKV" verify "$S"
	assert_equal "$output" ok
	# the parent's segment is still referenced by the child: gc frees nothing of it
	before=$(segbytes "$S")
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 0 segments, 0 staging areas, 0 stray records"
	[ -d "$S/seg/${P:0:2}/$P-0" ]
	assert_equal "$(segbytes "$S")" "$before"
	run -0 "$CKV" stat "$S" "$C" --json
	assert_equal "$(jq .bytes_shared <<<"$output")" 0
	# once the child goes too, gc frees both segments: seg/ holds no segment
	run -0 "$CKV" rm "$S" "$C"
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 2 segments, 0 staging areas, 0 stray records"
	freed=$(sed -n 's/.*(\([0-9]*\) bytes)$/\1/p' <<<"$output")
	[ "$freed" -ge $((75 * CB * L)) ] || fail "freed $freed"
	[ "$(seg_count "$S")" -eq 0 ]
	[ -z "$(find "$S/prefix" -type f)" ]
	run -0 "$CKV" ls "$S"
	[ -z "$output" ]
	# and the parent comes back from its export, whole
	run -0 "$CKV" import -q "$S" "$T/p1"
	"$CKV" export "$S" "$P" "$T/p2"
	assert_same_dir "$T/p1" "$T/p2"
}

@test "rm of the child leaves the parent; gc frees exactly the child's segment" {
	C=$(gen_hash "$S" --extends "$P" -n 200)
	run -0 "$CKV" rm "$S" "$C"
	run -0 "$CKV" gc "$S"
	assert_output_contains "removed 1 segments, 0 staging areas, 0 stray records"
	[ ! -e "$S/seg/${C:0:2}/$C-62" ]
	[ -d "$S/seg/${P:0:2}/$P-0" ]
	[ "$(seg_count "$S")" -eq 1 ]
	run -0 "$CKV" verify "$S"
	# the child can be generated again, sharing the parent again
	run -0 "$CKV" gen "$S" --extends "$P" -n 200
	assert_equal "${lines[1]%%  written*}" "new chunks 13  shared chunks 62"
	assert_equal "${lines[2]}" "$C"
}
