#!/usr/bin/env bats
# The loader's tools on an embedded store: ckv-reprefill (one Re-Prefill pass
# per mode, as the demo runs it) and bench-loader (fetch vs raw io_uring).
load test_helper
load loader_helper

setup_file() {
	export REPREFILL BENCH
	REPREFILL=$(loader_tool ckv-reprefill "$BATS_FILE_TMPDIR")
	BENCH=$(loader_tool bench-loader "$BATS_FILE_TMPDIR")
}

setup() {
	T="$BATS_TEST_TMPDIR"
	export ASAN_OPTIONS=${ASAN_OPTIONS}:protect_shadow_gap=0
}

demo_store() {
	"$CKV" init "$T/s" >/dev/null
	P=$("$CKV" gen -q --no-sync "$T/s" --model qwen2.5-0.5b --tokens 2048 --seed 7)
	C=$("$CKV" gen -q --no-sync "$T/s" --extends "$P" --tokens 512 --seed 8)
}

@test "ckv-reprefill: every mode, full reads each chunk once (amplification 1.000)" {
	[ -x "$REPREFILL" ] || skip "ckv-reprefill could not be built"
	demo_store
	run "$REPREFILL" -m full -m period -m layer -m rerank -b 0.1 --compute-ms 0.2 --backend host "$T/s" "$C"
	echo "$output"
	assert_success
	[[ "$output" =~ \|\ full\ +\|\ host\ \|\ +1\.00\ \|\ +3840\ /\ 3840\ .*\|\ 1\.000\ \| ]] || fail "full row: $output"
	assert_output_contains "| period |"
	assert_output_contains "| layer  |"
	assert_output_contains "| rerank |"
	[ "$(grep -c '|   0.10 |' <<<"$output")" -eq 3 ]
}

@test "ckv-reprefill: no_prefetch layer mode reads exactly what it uses" {
	[ -x "$REPREFILL" ] || skip "ckv-reprefill could not be built"
	demo_store
	run "$REPREFILL" -m layer --no-prefetch -b 0.2 --compute-ms 0 --backend host "$T/s" "$C"
	assert_success
	[[ "$output" =~ \|\ 1\.000\ \| ]] || fail "expected amplification 1.000: $output"
	assert_output_contains "0 / 0"
}

@test "ckv-reprefill: usage and bad input" {
	[ -x "$REPREFILL" ] || skip "ckv-reprefill could not be built"
	run "$REPREFILL" -m sideways x y
	assert_failure 2
	assert_output_contains "--mode sideways"
	run "$REPREFILL" -h
	assert_success
	assert_output_contains "usage: ckv-reprefill"
	demo_store
	run "$REPREFILL" --backend host "$T/s" 00000000000000000000000000000000
	assert_failure 1
	assert_output_contains "not stored"
}

@test "bench-loader: one table, the cold loader reads exactly the selected bytes" {
	[ -x "$BENCH" ] || skip "bench-loader could not be built"
	run "$BENCH" --ckv "$CKV" -m qwen2.5-0.5b -n 4096 -r 1 --backend host "$T/w"
	echo "$output"
	assert_success
	assert_output_contains "| raw io_uring O_DIRECT, QD 128, merged"
	assert_output_contains "| loader cold, all layers in flight"
	assert_output_contains "| loader warm (arena hits)"
	assert_output_contains "| loader warm, first pass after cold"
	assert_output_contains "² steady state: 25 pairs of one warm pass and one copy of the same bytes (25 a run"
	assert_output_contains "warm hit path per layer ("
	assert_output_contains "read amplification of the cold loader: 1.000"
	assert_output_contains "identification per layer, 16 new tokens x 14 query heads"
	assert_output_contains "| digest scores (digest.bin)"
	assert_output_contains "| key-copy mass scores (keyq.bin)"
	# a second run reuses the generated store
	run "$BENCH" --ckv "$CKV" -m qwen2.5-0.5b -n 4096 -r 2 --pairs 3 --backend host --plant 0.1 "$T/w"
	assert_success
	assert_output_contains "² steady state: 6 pairs of one warm pass and one copy of the same bytes (3 a run"
	assert_output_contains "digest top-k of planted query"
}

@test "bench-loader: usage" {
	[ -x "$BENCH" ] || skip "bench-loader could not be built"
	run "$BENCH" --budget 2 "$T/w"
	assert_failure 2
	assert_output_contains "--budget 2"
	run "$BENCH" --gather-threads 100 "$T/w"
	assert_failure 2
	assert_output_contains "--gather-threads 100: not a multiple of 32"
	run "$BENCH" --gather-threads 2048 "$T/w"
	assert_failure 2
	assert_output_contains "--gather-threads 2048: expected 64..1024"
	run "$BENCH" --pairs 0 "$T/w"
	assert_failure 2
	assert_output_contains "--pairs 0: expected 1..200"
	run "$BENCH" --pairs 12x "$T/w"
	assert_failure 2
	assert_output_contains "--pairs 12x: expected 1..200"
	run "$BENCH" -V
	assert_success
	assert_output_contains "bench-loader"
}
