#!/usr/bin/env bats
# The Python loader binding (gpu/python/ckv/loader.py) over libckvgpu.so on an
# embedded store (no daemon, no FUSE): match, fetch of every part, digest
# scores finding planted chunks, every pipeline mode, K/V tensor views, the
# GPU tier, errors as CkvError — with torch if installed, and numpy-only.
load test_helper
load loader_helper

setup_file() {
	export LOADER_SO
	LOADER_SO=$(loader_so "$BATS_FILE_TMPDIR")
}

setup() {
	PY=${CKV_PYTHON:-$PY} # another Python (one with torch+CUDA, say) for the binding
	"$PY" -c 'import numpy, xxhash' 2>/dev/null || skip "/usr/bin/python3 lacks numpy or xxhash"
	[ -n "$LOADER_SO" ] && [ -f "$LOADER_SO" ] || skip "no libckvgpu.so (build failed?)"
	loader_py_env "$LOADER_SO"
	T="$BATS_TEST_TMPDIR"
	"$CKV" init "$T/s" >/dev/null
	H=$("$CKV" gen -q --no-sync "$T/s" --model qwen2.5-0.5b --tokens 1500 --seed 4 \
		--plant 0.1 --plant-out "$T/plant.json")
	"$CKV" export "$T/s" "$H" "$T/exp" >/dev/null
}

@test "loader binding: host backend, torch tensors when torch is installed" {
	run lpy "$BATS_TEST_DIRNAME/loader_check.py" "$T/s" "$T/exp" "$H" "$T/plant.json" host
	echo "$output"
	assert_success
	assert_output_contains "ok"
}

@test "loader binding: host backend without torch (numpy arrays)" {
	run lpy -c 'import sys, runpy; sys.modules["torch"] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' \
		"$BATS_TEST_DIRNAME/loader_check.py" "$T/s" "$T/exp" "$H" "$T/plant.json" host
	echo "$output"
	assert_success
	assert_output_contains "ok numpy"
}

@test "loader binding: embedded by default, no daemon, no mount" {
	run lpy - "$T/s" "$H" <<'PY'
import os, sys
from ckv import Loader
ld = Loader(sys.argv[1])
assert not ld.remote
assert ld.backend in ("host", "cuda")
p = ld.open(sys.argv[2])
print(p.shape.chunks, p.shape.layers)
ld.close()  # closes the prefix too
PY
	assert_success
	assert_output_contains "94 24"
	# nothing serves this store but the Python process itself
	run pgrep -f "ckvfs.*$T/s"
	assert_failure
	[ ! -e "$T/s/.ckv" ]
}

@test "loader binding: a bad path raises CkvError naming it" {
	run lpy -c 'import sys
from ckv import Loader, CkvError
try:
    Loader("/nonexistent/store", backend="host")
except CkvError as e:
    print("errno", e.errno, str(e))' 
	assert_success
	assert_output_contains "errno 2"
	assert_output_contains "/nonexistent/store"
}

@test "loader binding: CUDA backend with torch CUDA tensors (needs a GPU)" {
	lpy -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null ||
		skip "no torch with CUDA here"
	run lpy "$BATS_TEST_DIRNAME/loader_check.py" "$T/s" "$T/exp" "$H" "$T/plant.json" cuda
	echo "$output"
	assert_success
	assert_output_contains "ok torch"
}
