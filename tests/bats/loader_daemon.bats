#!/usr/bin/env bats
# The loader through a ckvfs daemon (DESIGN §6): chunk data comes from the
# daemon's arena over the control socket, never through FUSE reads. Host
# backend here; tests/gpu/run.sh runs it with CKV_TEST_BACKEND=cuda.

load test_helper
load loader_helper

setup_file() {
	LOADER_SO=$(loader_so "$BATS_FILE_TMPDIR")
	export LOADER_SO
}

setup() {
	fs_require
	"$PY" -c 'import numpy' 2>/dev/null || skip "no numpy for $PY"
	loader_py_env "$LOADER_SO"
	T=$BATS_TEST_TMPDIR
	"$CKV" init "$T/s"
	H=$("$CKV" gen -q "$T/s" --model qwen2.5-0.5b --tokens 3000 --seed 5)
	"$CKV" export "$T/s" "$H" "$T/exp"
	fs_mount "$T/s" "$T/m" -o cache=64M
}

teardown() {
	fs_teardown
}

@test "loader via the daemon: every part of random chunk sets equals the exported bytes" {
	[ -L "$T/m/.ckv/ctl" ]
	run lpy "$BATS_TEST_DIRNAME/loader_daemon_check.py" "$T/m" "$T/exp" "$H" check 40
	assert_success
	assert_output_contains "ok: 40 fetches"
	# the chunks came through the daemon's engine, not FUSE reads
	[ "$(fs_stat "$T/m" fuse_reads)" -eq 0 ]
	[ "$(fs_stat "$T/m" misses)" -gt 0 ]
	[ "$(fs_stat "$T/m" pinned)" -eq 0 ]
}

@test "key-copy scores and a keyq pipeline through the daemon equal the embedded loader's" {
	run lpy - "$T/m" "$T/s" "$H" <<'PY'
import sys
import numpy as np
from ckv.loader import Loader
mnt, store, h = sys.argv[1:4]
rng = np.random.default_rng(3)
with Loader(mnt, backend="host") as d, Loader(store, backend="host") as e:
    assert d.remote and not e.remote
    with d.open(h) as pd, e.open(h) as pe:
        s = pd.shape
        for l in range(s.layers):
            q = rng.standard_normal((4, 14, s.head_dim)).astype(np.float32)
            k = rng.standard_normal((4, s.kv_heads, s.head_dim)).astype(np.float32)
            a, b = pd.keyq_scores(l, q, k), pe.keyq_scores(l, q, k)
            assert np.array_equal(a, b), (l, a[:4], b[:4])
        sets = []
        for p in (pd, pe):
            with p.pipeline(mode="layer", budget=0.2, q_heads=14, q_tokens=4, score="keyq",
                            budgets=[0.05 if l % 2 else 0.3 for l in range(s.layers)],
                            floor=0.05) as pl:
                r = np.random.default_rng(4)
                got = []
                for l in range(s.layers):
                    q = r.standard_normal((4, 14, s.head_dim)).astype(np.float32)
                    k = r.standard_normal((4, s.kv_heads, s.head_dim)).astype(np.float32)
                    got.append(pl.layer(l, q, k).chunks.tolist())
                st = pl.stats()
            sets.append(got)
        assert sets[0] == sets[1]
print("keyq ok", s.layers, "layers; identifications", st["identifications"])
PY
	echo "$output"
	assert_success
	assert_output_contains "keyq ok 24 layers; identifications 12"
	[ "$(fs_stat "$T/m" pinned)" -eq 0 ]
}

@test "several loader processes share one daemon arena" {
	local pids="" p
	for p in 1 2 3 4; do
		lpy "$BATS_TEST_DIRNAME/loader_daemon_check.py" "$T/m" "$T/exp" "$H" check 30 \
			> "$T/out.$p" 2>&1 &
		pids="$pids $!"
	done
	for p in $pids; do
		wait "$p" || { cat "$T"/out.*; fail "a loader process failed"; }
	done
	for p in 1 2 3 4; do grep -q "ok: 30 fetches" "$T/out.$p"; done
	# one arena: the four processes' reads hit each other's chunks
	[ "$(fs_stat "$T/m" hits)" -gt 0 ]
	[ "$(fs_stat "$T/m" pinned)" -eq 0 ]
}

pinned_zero() { [ "$(fs_stat "$T/m" pinned)" -eq 0 ]; }

@test "a loader killed mid-fetch leaks no pins" {
	lpy "$BATS_TEST_DIRNAME/loader_daemon_check.py" "$T/m" "$T/exp" "$H" hold > "$T/hold" 2>&1 &
	local pid=$!
	wait_until 20 grep -q fetching "$T/hold"
	sleep 0.5
	kill -9 "$pid"
	wait "$pid" 2>/dev/null || [ $? -eq 137 ]
	wait_until 10 pinned_zero
	# the daemon carries on serving the next loader
	run lpy "$BATS_TEST_DIRNAME/loader_daemon_check.py" "$T/m" "$T/exp" "$H" check 5
	assert_success
}
