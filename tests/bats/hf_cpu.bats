#!/usr/bin/env bats
# The transformers integration's pure-Python parts on the CPU (gpu/python/ckv/hf.py,
# kvcache.py, prune.py): no GPU, no transformers. tests/hf_cpu_test.py has the cases;
# a stand-in Qwen2-shaped model (tests/hf_tiny_model.py) calls ckv.hf.attention the
# way transformers' Qwen2 does. The GPU side is tests/gpu/test_hf.py.
load test_helper
load loader_helper

setup_file() {
	export LOADER_SO
	LOADER_SO=$(loader_so "$BATS_FILE_TMPDIR")
}

setup() {
	"$PY" -c 'import torch, numpy, xxhash' 2>/dev/null || skip "/usr/bin/python3 lacks torch, numpy or xxhash"
	[ -x "$CKV" ] || skip "no $CKV (make)"
	[ -n "$LOADER_SO" ] && [ -f "$LOADER_SO" ] || skip "no libckvgpu.so (build failed?)"
	loader_py_env "$LOADER_SO"
}

@test "hf: writer, selection rules and Re-Prefill through the loader (unittest)" {
	run lpy "$BATS_TEST_DIRNAME/../hf_cpu_test.py"
	echo "$output"
	assert_success
	assert_output_contains "OK"
	# the store and loader cases ran (they skip only without $CKV / libckvgpu.so)
	refute_output_contains "needs \$CKV and \$CKV_LIBCKVGPU"
	refute_output_contains "no \$CKV_LIBCKVGPU"
}

@test "hf: ckv.hf imports without transformers and says what is missing" {
	run lpy -c 'import sys
sys.modules["transformers"] = None
import ckv.hf as H
print("available", H.transformers_available())
class M: config = None
try:
    H.install(M())
except ImportError as e:
    print("error:", e)'
	assert_success
	assert_output_contains "available False"
	assert_output_contains "needs the transformers package"
}

@test "hf: tools/quality eval runs end to end (stand-in model, host backend)" {
	run lpy "$CKV_SRC/tools/quality" eval --stand-in --device cpu --backend host --windows 1 \
		--prefix 96 --suffix 16 --budgets 0.25 --modes layer --loader-extra full,layer:keyq:cal \
		--policies "linear,lowbit2,massvar*calr,lowbit3*calr" --calibrate 1 \
		--store "$BATS_TEST_TMPDIR/q" --out "$BATS_TEST_TMPDIR/q.json"
	echo "$output"
	assert_success
	assert_output_contains "| loader:layer@0.25 | 1 |"
	assert_output_contains "| py:massvar*calr@0.25 | 1 |"
	# the Python mirror of the C layer mode chooses the same chunks: same loss
	run "$PY" -c 'import json, sys
r = {x["name"]: x for x in json.load(open(sys.argv[1]))["rows"]}
print("same", abs(r["loader:layer@0.25"]["loss"] - r["py:linear@0.25"]["loss"]) < 1e-6)
# the calibrated schedule with key-copy scores in the C loader = ckv.prune lowbit3*calr
print("keyq", abs(r["loader:layer@0.25:cal=1:score=keyq"]["loss"] - r["py:lowbit3*calr@0.25"]["loss"]) < 1e-6)
print("full", r["loader:full@1"]["delta_pct"] == 0.0)' "$BATS_TEST_TMPDIR/q.json"
	assert_output_contains "same True"
	assert_output_contains "keyq True"
	assert_output_contains "full True"
}

@test "hf: tools/quality ttft with key-copy scores (stand-in model, host backend)" {
	run lpy "$CKV_SRC/tools/quality" ttft --stand-in --device cpu --backend host --prefix 96 \
		--suffix 16 --budgets 0.25 --ttft-modes layer --score keyq --reps 1 \
		--store "$BATS_TEST_TMPDIR/t" --out "$BATS_TEST_TMPDIR/t.json" --md "$BATS_TEST_TMPDIR/t.md"
	echo "$output"
	assert_success
	run cat "$BATS_TEST_TMPDIR/t.md"
	assert_output_contains "| Re-Prefill | layer, score=keyq | 25% | cold |"
	assert_output_contains "| Re-Prefill | layer, score=keyq | 25% | warm |"
	# the key copy was what the pipeline read: more bytes than the digests a warm pass reads
	run lpy "$CKV_SRC/tools/quality" ttft --stand-in --device cpu --backend host --prefix 96 \
		--suffix 16 --budgets 0.25 --ttft-modes layer --score digest --reps 1 \
		--store "$BATS_TEST_TMPDIR/t" --out "$BATS_TEST_TMPDIR/d.json" --md "$BATS_TEST_TMPDIR/d.md"
	assert_success
	run lpy -c 'import json, sys
warm = [[r["bytes"] for r in json.load(open(f))["rows"]
         if r.get("budget") == 0.25 and r["scenario"] == "warm"][0] for f in sys.argv[1:]]
print("keyq reads more", warm[0] > warm[1], warm)' "$BATS_TEST_TMPDIR/t.json" "$BATS_TEST_TMPDIR/d.json"
	assert_output_contains "keyq reads more True"
	run lpy "$CKV_SRC/tools/quality" ttft --stand-in --score bogus --store "$BATS_TEST_TMPDIR/t"
	assert_failure
	assert_output_contains "invalid choice: 'bogus'"
}

@test "hf: a cache saved through a mount's import/ area is found by the loader" {
	fs_require
	"$CKV" init "$BATS_TEST_TMPDIR/s" >/dev/null
	fs_mount "$BATS_TEST_TMPDIR/s" "$BATS_TEST_TMPDIR/mnt" -o publish_delay=100
	run lpy - "$BATS_TEST_TMPDIR/mnt" "$BATS_TEST_TMPDIR/s" "$BATS_TEST_DIRNAME/.." <<'PY'
import sys, torch
sys.path.insert(0, sys.argv[3])
import ckv.hf as H
from ckv import Loader
from hf_tiny_model import TinyQwen
m = TinyQwen(layers=2).eval()
toks = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(1)).tolist()
h = H.save_prefix(m, toks[:70], mount=sys.argv[1])
ref = H.full_kv_logits(m, toks, 70)
with Loader(sys.argv[1], backend="host") as ld:
    r = H.reprefill(m, toks, ld, mode="layer", budget=1.0)
    print("remote", ld.remote)
print("hash", h == r.hash, "matched", r.matched)
print("maxdiff", float((r.logits - ref).abs().max()))
PY
	echo "$output"
	fs_umount "$BATS_TEST_TMPDIR/mnt"
	assert_success
	assert_output_contains "hash True matched 70"
	assert_output_contains "maxdiff 0.0"
	assert_output_contains "remote True"
}

teardown() {
	fs_teardown
}
