#!/usr/bin/env bats
# ckv gen: deterministic synthetic caches with real models' shapes, custom
# shapes, --extends (the next turn of a dialogue) and --plant.

load test_helper

setup() {
	T=$BATS_TEST_TMPDIR
	"$CKV" init "$T/s"
}

# mf DIR KEY: a field of DIR/manifest.json
mf() {
	jq -r ".$2" "$1/manifest.json"
}

@test "gen is deterministic: same arguments, same hash, byte-identical export" {
	"$CKV" init "$T/s2"
	a=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 300 --seed 7)
	b=$(gen_hash "$T/s2" -m qwen2.5-0.5b -n 300 --seed 7)
	assert_equal "$a" "$b"
	[[ "$a" =~ ^[0-9a-f]{32}$ ]] || fail "not a hash: $a"
	"$CKV" export "$T/s" "$a" "$T/e1"
	"$CKV" export "$T/s2" "$b" "$T/e2"
	assert_same_dir "$T/e1" "$T/e2"
	# again into the same store: already stored, nothing new written
	run -0 "$CKV" gen "$T/s" -m qwen2.5-0.5b -n 300 --seed 7
	assert_output_contains "(already stored)"
	assert_equal "${lines[2]}" "$a"
	[ "$(seg_count "$T/s")" -eq 1 ]
	# another seed, other tokens, another prefix
	c=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 300 --seed 8)
	[ "$c" != "$a" ]
	"$CKV" export "$T/s" "$c" "$T/e3"
	run -1 cmp -s "$T/e1/tokens.bin" "$T/e3/tokens.bin"
	run -1 cmp -s "$T/e1/layer_000.kv" "$T/e3/layer_000.kv"
}

@test "gen prints the shape, new and shared chunks, and the hash" {
	run -0 --separate-stderr "$CKV" gen "$T/s" -m qwen2.5-0.5b -n 100
	assert_stderr_empty
	assert_equal "${lines[0]}" "model Qwen/Qwen2.5-0.5B  tokens 100  chunks 7  "
	assert_equal "${lines[1]}" "new chunks 7  shared chunks 0  written 1.3 MiB"
	[[ "${lines[2]}" =~ ^[0-9a-f]{32}$ ]] || fail "got: $output"
	[ "${#lines[@]}" -eq 3 ]
}

@test "gen: every preset has its model's shape (manifest layers, kv_heads, head_dim, chunk_bytes)" {
	while read -r preset model L H D cb; do
		h=$(gen_hash "$T/s" -m "$preset" -n 20)
		"$CKV" export "$T/s" "$h" "$T/$preset"
		e=$T/$preset
		assert_equal "$(mf "$e" model) $(mf "$e" layers) $(mf "$e" kv_heads) $(mf "$e" head_dim) $(mf "$e" chunk_bytes)" \
			"$model $L $H $D $cb"
		assert_equal "$(mf "$e" dtype) $(mf "$e" chunk_tokens) $(mf "$e" tokens) $(mf "$e" chunks) $(mf "$e" layout)" \
			"bf16 16 20 2 KV-HCD"
		[ "$(ls "$e" | grep -c '^layer_...\.kv$')" -eq "$L" ] || fail "$preset: layer file count"
		[ "$(stat -c %s "$e/layer_$(printf %03d $((L - 1))).kv")" -eq $((2 * cb)) ] || fail "$preset: layer size"
		[ "$(stat -c %s "$e/sums.xxh3")" -eq $((32 + 8 * L * 2)) ] || fail "$preset: sums size"
		run -0 "$CKV" verify "$T/s" "$h"
		rm -rf "$e"
	done <<-EOF
		qwen2.5-0.5b Qwen/Qwen2.5-0.5B 24 2 64 8192
		qwen2.5-1.5b Qwen/Qwen2.5-1.5B 28 2 128 16384
		qwen2.5-3b Qwen/Qwen2.5-3B 36 2 128 16384
		qwen2.5-7b Qwen/Qwen2.5-7B 28 4 128 32768
		qwen2.5-14b Qwen/Qwen2.5-14B 48 8 128 65536
		qwen2.5-32b Qwen/Qwen2.5-32B 64 8 128 65536
		qwen2.5-72b Qwen/Qwen2.5-72B 80 8 128 65536
	EOF
	run -0 "$CKV" ls "$T/s"
	[ "${#lines[@]}" -eq 7 ]
}

@test "gen: custom shapes (--layers --kv-heads --head-dim --dtype --chunk --model-id --salt)" {
	# args | model dtype layers kv_heads head_dim chunk_tokens chunk_bytes
	while IFS='|' read -r args want; do
		h=$(gen_hash "$T/s" $args -n 50)
		rm -rf "$T/e"
		"$CKV" export "$T/s" "$h" "$T/e"
		got="$(mf "$T/e" model) $(mf "$T/e" dtype) $(mf "$T/e" layers) $(mf "$T/e" kv_heads) $(mf "$T/e" head_dim) $(mf "$T/e" chunk_tokens) $(mf "$T/e" chunk_bytes)"
		assert_equal "$got" "$want"
		read -r _ _ L _ _ c cb <<<"$want"
		m=$(((50 + c - 1) / c))
		[ "$(mf "$T/e" chunks)" -eq "$m" ]
		[ "$(ls "$T/e" | grep -c '^layer_...\.kv$')" -eq "$L" ]
		for f in "$T"/e/layer_*.kv; do
			[ "$(stat -c %s "$f")" -eq $((m * cb)) ] || fail "$args: $f is $(stat -c %s "$f") bytes"
		done
		# ckv hash with the same options agrees with the stored hash
		run -0 "$CKV" hash $args --tokens "$T/e/tokens.bin"
		assert_equal "${lines[-1]}" "prefix $h"
		run -0 "$CKV" verify "$T/s" "$h"
	done <<-'EOF'
		--model-id test/fp16 --layers 3 --kv-heads 3 --head-dim 80 --dtype fp16 --chunk 32|test/fp16 fp16 3 3 80 32 32768
		--model-id test/fp8 --layers 2 --kv-heads 1 --head-dim 64 --dtype fp8_e4m3|test/fp8 fp8_e4m3 2 1 64 16 4096
		--model-id test/fp32 --layers 1 --kv-heads 2 --head-dim 128 --dtype fp32 --chunk 8|test/fp32 fp32 1 2 128 8 16384
		-m my/model --layers 5 --kv-heads 1 --head-dim 16|my/model bf16 5 1 16 16 4096
		-m qwen2.5-0.5b --layers 4|Qwen/Qwen2.5-0.5B bf16 4 2 64 16 8192
		-m qwen2.5-7b --dtype fp8_e4m3 --chunk 4|Qwen/Qwen2.5-7B fp8_e4m3 28 4 128 4 4096
	EOF
	# salt is part of the identity: same tokens, another hash
	a=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 50)
	b=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 50 --salt tenant-a)
	[ "$a" != "$b" ]
	run -0 "$CKV" stat "$T/s" "$b"
	assert_output_contains "salt tenant-a"
}

@test "gen: chunk padding and the unused slots of the last chunk are zero" {
	# fp16, H=3 c=32 D=80: half 15360, chunk 32768 (2048 bytes padding); 50 tokens: chunk 1 holds 18
	h=$(gen_hash "$T/s" --model-id test/pad --layers 1 --kv-heads 3 --head-dim 80 --dtype fp16 --chunk 32 -n 50)
	"$CKV" export "$T/s" "$h" "$T/e"
	f=$T/e/layer_000.kv
	cmp -i 30720:0 -n 2048 "$f" /dev/zero                    # chunk 0 padding
	cmp -i $((32768 + 30720)):0 -n 2048 "$f" /dev/zero       # chunk 1 padding
	row=160                                                   # head_dim * 2 bytes
	for hd in 0 1 2; do
		for kv in 0 15360; do
			base=$((32768 + kv + hd * 32 * row))
			cmp -i $((base + 18 * row)):0 -n $((14 * row)) "$f" /dev/zero # slots 18..31
			run -1 cmp -s -i "$base":0 -n $((18 * row)) "$f" /dev/zero     # slots 0..17 hold data
		done
	done
}

@test "gen --extends: the child starts with the parent's tokens and shares its chunks' bytes" {
	p=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 250 --seed 3)
	run -0 "$CKV" gen "$T/s" --extends "$p" -n 90
	# 250 tokens: 15 full chunks + 10; 340 tokens: 22 chunks, 15 shared
	assert_equal "${lines[0]}" "model Qwen/Qwen2.5-0.5B  tokens 340  chunks 22  "
	assert_equal "${lines[1]%%  written*}" "new chunks 7  shared chunks 15"
	c=${lines[2]}
	"$CKV" export "$T/s" "$p" "$T/p"
	"$CKV" export "$T/s" "$c" "$T/c"
	[ "$(mf "$T/c" tokens)" -eq 340 ]
	cmp -n 1000 "$T/p/tokens.bin" "$T/c/tokens.bin"
	run -1 cmp -s "$T/p/tokens.bin" "$T/c/tokens.bin" # (sizes differ)
	for l in $(seq 0 23); do
		f=$(printf 'layer_%03d.kv' "$l")
		cmp -n $((15 * 8192)) "$T/p/$f" "$T/c/$f"
		# the parent's partial chunk 15 (10 tokens): its K rows equal the child's
		cmp -i $((15 * 8192)) -n $((10 * 128)) "$T/p/$f" "$T/c/$f"
	done
	# ... and its empty slots are zero where the child has data
	cmp -i $((15 * 8192 + 10 * 128)):0 -n $((6 * 128)) "$T/p/layer_000.kv" /dev/zero
	run -1 cmp -s -i $((15 * 8192 + 10 * 128)):0 -n $((6 * 128)) "$T/c/layer_000.kv" /dev/zero
	run -0 "$CKV" verify "$T/s"
	# the child's export stands alone: into an empty store and back, byte-identical
	"$CKV" init "$T/s2"
	run -0 "$CKV" import -q "$T/s2" "$T/c"
	assert_equal "$output" "$c"
	"$CKV" export "$T/s2" "$c" "$T/c2"
	assert_same_dir "$T/c" "$T/c2"
}

@test "gen --extends: a shape that differs from the stored prefix is a usage error" {
	p=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 40)
	before=$(store_snapshot "$T/s")
	run -2 --separate-stderr "$CKV" gen "$T/s" --extends "$p" -n 10 -m qwen2.5-7b
	assert_stderr_contains "--extends $p: the stored prefix has another shape"
	run -2 --separate-stderr "$CKV" gen "$T/s" --extends "$p" -n 10 --layers 3
	assert_stderr_contains "another shape"
	assert_equal "$(store_snapshot "$T/s")" "$before"
	# the same shape spelled out is fine
	run -0 "$CKV" gen -q "$T/s" --extends "$p" -n 10 -m qwen2.5-0.5b
}

@test "gen --plant writes the planted chunk list and a query that selects exactly them" {
	cd "$T"
	run -0 "$CKV" gen -q "$T/s" -m qwen2.5-0.5b -n 800 --plant 0.1
	h=$output
	pj=$T/$h.plant.json
	[ -f "$pj" ] || fail "no $pj"
	assert_equal "$(jq -r .hash "$pj")" "$h"
	assert_equal "$(jq -c '[.chunks_total, .layers, .kv_heads, .head_dim, .fraction]' "$pj")" "[50,24,2,64,0.1]"
	# round(0.1 * 50) = 5 distinct chunks, never the first or the last
	assert_equal "$(jq '.planted | length' "$pj")" 5
	assert_equal "$(jq '.planted | unique | length' "$pj")" 5
	assert_equal "$(jq '[.planted[] | select(. >= 1 and . <= 48)] | length' "$pj")" 5
	assert_equal "$(jq -c '[(.query | length), (.query[0] | length), (.query[23][1] | length)]' "$pj")" "[24,2,64]"
	# --plant-out, and planting in an extension picks only new chunks
	run -0 "$CKV" gen -q "$T/s" --extends "$h" -n 800 --plant 0.05 --plant-out "$T/child.json"
	c=$output
	assert_equal "$(jq -r .hash "$T/child.json")" "$c"
	assert_equal "$(jq '.planted | length' "$T/child.json")" 5
	assert_equal "$(jq '[.planted[] | select(. >= 50 and . <= 98)] | length' "$T/child.json")" 5
	# the query's top-5 chunks by mean-key score (layer 0, head 0) are the planted ones
	"$CKV" export "$T/s" "$h" "$T/e"
	"$PY" - "$T/e/layer_000.kv" "$pj" <<-'EOF'
		import json, struct, sys
		data = open(sys.argv[1], "rb").read()
		p = json.load(open(sys.argv[2]))
		q = p["query"][0][0]
		scores = []
		for j in range(p["chunks_total"]):
		    base = j * 8192                       # chunk j, K of head 0 at its start
		    n = min(16, 800 - 16 * j)
		    s = 0.0
		    for t in range(n):
		        row = struct.unpack_from("<64H", data, base + t * 128)
		        k = [struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in row]
		        s += sum(a * b for a, b in zip(q, k))
		    scores.append((s / n, j))
		top = sorted(j for _, j in sorted(scores, reverse=True)[:5])
		assert top == sorted(p["planted"]), (top, p["planted"])
	EOF
}

@test "gen --plant: more planted chunks than new chunks is a usage error and publishes nothing" {
	cd "$T"
	run -2 --separate-stderr "$CKV" gen "$T/s" -m qwen2.5-0.5b -n 40 --plant 0.9
	assert_stderr_contains "--plant 0.900: 3 chunks wanted but only 1 new chunks can be planted"
	run -0 "$CKV" ls "$T/s"
	[ -z "$output" ]
	[ -z "$(ls "$T" | grep plant.json)" ] || fail "a plant file was written"
	[ "$(seg_count "$T/s")" -eq 0 ]
}
