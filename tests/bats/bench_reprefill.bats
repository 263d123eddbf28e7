#!/usr/bin/env bats
# bench-reprefill --small on the host backend: invariants of what each system
# reads, never times (docs/BENCHMARKS.md, "Re-Prefill").

load test_helper

BENCH="$CKV_BUILD/bench-reprefill"
TRACE="$CKV_SRC/../shared/traces/codelm-12L-attn-8x12x3840.f32"

setup_file() {
	[ -x "$BENCH" ] || return 0
	# one run shared by the tests below: cold and warm scenarios, every system
	"$BENCH" --small --backend host --no-drop -q --scenarios cold,warm,stats \
		--json "$BATS_FILE_TMPDIR/small.json" --markdown "$BATS_FILE_TMPDIR/small.md" \
		"$BATS_FILE_TMPDIR/work" >"$BATS_FILE_TMPDIR/small.out" 2>&1 ||
		echo $? >"$BATS_FILE_TMPDIR/small.rc"
}

need_bench() {
	[ -x "$BENCH" ] || skip "no $BENCH (make)"
	if [ -f "$BATS_FILE_TMPDIR/small.rc" ]; then
		cat "$BATS_FILE_TMPDIR/small.out" >&2
		fail "bench-reprefill --small exited $(cat "$BATS_FILE_TMPDIR/small.rc")"
	fi
}

# check PYTHON-EXPRESSIONS: run assertions over the runs of the shared JSON.
check() {
	"$PY" - "$BATS_FILE_TMPDIR/small.json" "$@" <<'EOF'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
def pick(scenario, system, **kw):
    return [r for r in runs if r["scenario"] == scenario and r["system"] == system
            and all(r[k] == v for k, v in kw.items())]
bad = []
for expr in sys.argv[2:]:
    ok = eval(expr, {"runs": runs, "pick": pick})
    if not ok:
        bad.append(expr)
if bad:
    print("failed:", *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
EOF
}

@test "bench-reprefill: usage errors exit 2" {
	[ -x "$BENCH" ] || skip "no $BENCH (make)"
	run "$BENCH"
	assert_failure 2
	run "$BENCH" --budgets 0 "$BATS_TEST_TMPDIR/w"
	assert_failure 2
	run "$BENCH" --systems fast "$BATS_TEST_TMPDIR/w"
	assert_failure 2
	assert_output_contains "--systems fast"
	run "$BENCH" --scenarios real "$BATS_TEST_TMPDIR/w"
	assert_failure 2
	assert_output_contains "--trace"
	run "$BENCH" -h
	assert_success
	assert_output_contains "usage:"
}

@test "bench-reprefill --small: every system of every cold cell ran" {
	need_bench
	check \
		'len(pick("cold", "full")) == 2' \
		'len(pick("cold", "bound")) == 2 + 2 * 2' \
		'all(len(pick("cold", s)) == 4 for s in ("impress", "noprefetch", "period", "layer", "rerank"))' \
		'all(r["time_s"] > 0 for r in runs)'
	grep -q '^## Cold' "$BATS_FILE_TMPDIR/small.md"
	grep -q '^## Warm' "$BATS_FILE_TMPDIR/small.md"
	grep -q '64-token blocks' "$BATS_FILE_TMPDIR/small.md"
}

@test "bench-reprefill --small: full load reads every byte" {
	need_bench
	check \
		'all(r["bytes_kv"] == r["layers"] * r["chunks"] * r["chunk_bytes"] for r in pick("cold", "full"))' \
		'all(r["bytes_needed"] == r["bytes_kv"] for r in pick("cold", "full"))' \
		'all(r["misses"] == r["layers"] * r["chunks"] and r["hits"] == 0 for r in pick("cold", "full"))'
}

@test "bench-reprefill --small: our read amplification is exactly 1.0 at chunk level" {
	need_bench
	# without prefetch every byte read is a byte the layers use
	check \
		'all(r["bytes_kv"] == r["bytes_needed"] and r["spec_wasted"] == 0 for r in pick("cold", "noprefetch"))'
	# with speculation, whatever is read beyond the needed chunks is exactly the
	# wasted speculative whole chunks: nothing partial, no block rounding
	check \
		'all(r["bytes_kv"] == r["bytes_needed"] + r["spec_wasted"] * r["chunk_bytes"] for s in ("period", "layer") for r in pick("cold", s))' \
		'all(r["bytes_kv"] % r["half_bytes"] == 0 for s in ("noprefetch", "period", "layer", "rerank") for r in pick("cold", s))'
	# and the chunks used are exactly the budget's count, as the bound reads
	check \
		'all(any(bd["bytes_kv"] == r["bytes_needed"] for bd in pick("cold", "bound", tokens=r["tokens"], budget=r["budget"])) for r in pick("cold", "noprefetch"))'
}

@test "bench-reprefill --small: IMPRESS-style reads at least as much as ours for the same importance" {
	need_bench
	check \
		'all(i["bytes_kv"] >= o["bytes_needed"] for i in pick("cold", "impress") for o in pick("cold", "noprefetch", tokens=i["tokens"], budget=i["budget"]))' \
		'all(i["bytes_kv"] + i["bytes_meta"] >= o["bytes_kv"] + o["bytes_meta"] for s in ("noprefetch", "period", "layer") for i in pick("cold", "impress") for o in pick("cold", s, tokens=i["tokens"], budget=i["budget"]))' \
		'all(i["bytes_kv"] > i["bytes_needed"] for i in pick("cold", "impress"))' \
		'all(i["bytes_meta"] > 0 for i in pick("cold", "impress"))'
}

@test "bench-reprefill --small: warm requests hit the arena" {
	need_bench
	check \
		'len(pick("warm", "period")) == 2' \
		'all(r["hits"] > 0 and r["requests"] == 32 for r in pick("warm", "period"))' \
		'len(pick("warm", "impress")) == 1 and len(pick("warm", "full")) == 1'
}

@test "bench-reprefill --small: the IMPRESS fallback reads every head's keys" {
	[ -x "$BENCH" ] || skip "no $BENCH (make)"
	run "$BENCH" --small --backend host --no-drop -q --scenarios cold --systems impress \
		--tokens 1024 --budgets 0.1 --impress-fallback 1 --json "$BATS_TEST_TMPDIR/fb.json" \
		"$BATS_TEST_TMPDIR/work"
	assert_success
	"$PY" - "$BATS_TEST_TMPDIR/fb.json" <<'EOF'
import json, sys
r = [r for r in json.load(open(sys.argv[1]))["runs"] if r["system"] == "impress"][0]
# every layer read the K halves of all its chunks instead of the probe keys
assert r["fallbacks"] == r["layers"], r
assert r["bytes_meta"] == r["layers"] * r["chunks"] * r["half_bytes"], r
EOF
}

@test "bench-reprefill --small: a real trace drives a scenario as it is" {
	[ -x "$BENCH" ] || skip "no $BENCH (make)"
	[ -f "$TRACE" ] || skip "no $TRACE beside the repository"
	run "$BENCH" --small --backend host --no-drop -q --scenarios real,stats --trace "$TRACE" \
		--real-windows 1 --budgets 0.1 --systems full,impress,noprefetch,period \
		--json "$BATS_TEST_TMPDIR/real.json" "$BATS_TEST_TMPDIR/work"
	assert_success
	assert_output_contains "real (codelm-12L-attn-8x12x3840.f32)"
	"$PY" - "$BATS_TEST_TMPDIR/real.json" <<'EOF'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
real = [r for r in runs if r["scenario"] == "real"]
assert {r["system"] for r in real} >= {"full", "impress", "noprefetch", "period", "bound"}, real
assert all(r["tokens"] == 3840 for r in real)
np = [r for r in real if r["system"] == "noprefetch"][0]
assert np["bytes_kv"] == np["bytes_needed"], np
EOF
}

@test "bench-reprefill: a bad trace file is refused with its name" {
	[ -x "$BENCH" ] || skip "no $BENCH (make)"
	head -c 1000 /dev/zero >"$BATS_TEST_TMPDIR/bad-1x2x3.f32"
	run "$BENCH" --small --backend host --no-drop -q --scenarios real --trace "$BATS_TEST_TMPDIR/bad-1x2x3.f32" \
		"$BATS_TEST_TMPDIR/work"
	assert_failure 1
	assert_output_contains "bad-1x2x3.f32"
	assert_output_contains "expected"
}
