#!/bin/bash
# Everything that needs a GPU, in one go (run it on the GPU machine):
#   tests/gpu/run.sh        build, CUDA unit tests, loader tests on the CUDA backend
#   tests/gpu/run.sh -b     ... and the GPU benchmarks (bench-gather -x, bench-loader)
#   tests/gpu/run.sh -b -f  ... and bench-fs (minutes: 10,000 prefixes)
# Writes logs to $OUT (or ./build/gpu-run) and prints a summary last.
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-build/gpu-run}
mkdir -p "$out"
bench=0 fsb=0
for a in "$@"; do
	case $a in
	-b) bench=1 ;;
	-f) fsb=1 ;;
	*) echo "usage: tests/gpu/run.sh [-b] [-f]" >&2; exit 2 ;;
	esac
done
export PATH=/usr/local/cuda/bin:$PATH
export ASAN_OPTIONS=${ASAN_OPTIONS:-protect_shadow_gap=0}
# a Python with numpy and torch for the binding's tests (the GPU machine's
# /usr/bin/python3 may lack them)
if [ -z "${CKV_PYTHON:-}" ]; then
	for p in $(which -a python3 2>/dev/null) /opt/torch/.venv/bin/python3; do
		if "$p" -c 'import numpy, torch' 2>/dev/null; then
			export CKV_PYTHON=$p
			break
		fi
	done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
make -j"$(nproc)" all > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
pass=0 fail=0 skip=0
run() { # name, command...
	local name=$1
	shift
	"$@" > "$out/$name.log" 2>&1
	case $? in
	0) pass=$((pass + 1)); echo "ok   $name" ;;
	77) skip=$((skip + 1)); echo "skip $name: $(tail -n 1 "$out/$name.log")" ;;
	*) fail=$((fail + 1)); echo "FAIL $name"; tail -n 20 "$out/$name.log" | sed 's/^/    /' ;;
	esac
}
for t in build/tests/gpu/*; do run "$(basename "$t")" "$t"; done
for t in build/tests/test_loader_*; do run "$(basename "$t")-cuda" env CKV_TEST_BACKEND=cuda "$t"; done
run loader_daemon-cuda env CKV_TEST_BACKEND=cuda CKV_BUILD="$PWD/build" bats tests/bats/loader_daemon.bats
run test_hf env CKV_BUILD="$PWD/build" PYTHONPATH="$PWD/gpu/python" "${CKV_PYTHON:-python3}" tests/gpu/test_hf.py
# the Python binding on CUDA tensors; a bats skip (no torch with CUDA, no xxhash) reports as a skip
run loader_python-cuda env CKV_BUILD="$PWD/build" bash -c \
	'out=$(bats -f "CUDA backend" tests/bats/loader_python.bats 2>&1); rc=$?; echo "$out"
	[ $rc -ne 0 ] && exit $rc; ! echo "$out" | grep -q "# skip" || exit 77'
if [ $bench = 1 ]; then
	run bench-gather build/bench-gather -x
	# 8, 32 and 64 KiB chunks, one layer's set (10% of 16K tokens) a fetch;
	# 8 KiB again with 25% (256 chunks a fetch)
	for m in qwen2.5-0.5b qwen2.5-7b qwen2.5-14b; do
		run "bench-loader-$m" build/bench-loader -m "$m" -r 5 --backend cuda "$(mktemp -d)"
	done
	run bench-loader-qwen2.5-0.5b-b25 build/bench-loader -m qwen2.5-0.5b -b 0.25 -r 5 --backend cuda "$(mktemp -d)"
	for b in bench-gather bench-loader-qwen2.5-0.5b bench-loader-qwen2.5-0.5b-b25 bench-loader-qwen2.5-7b \
		bench-loader-qwen2.5-14b; do
		echo "== $b"
		tail -n "$([ $b = bench-gather ] && echo 32 || echo 18)" "$out/$b.log"
	done
fi
if [ $fsb = 1 ]; then
	run bench-fs env CKV_BUILD="$PWD/build" tools/bench-fs.sh -t 16384 -n 10000 -R 3
	echo "== bench-fs"
	tail -n 14 "$out/bench-fs.log"
fi
echo "gpu: $pass passed, $fail failed, $skip skipped"
[ $fail -eq 0 ]
