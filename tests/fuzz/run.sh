#!/bin/bash
# Fuzz the control-protocol parser (ckv_ctl_parse) with libFuzzer.
#
#   tests/fuzz/run.sh [SECONDS] [-- extra libFuzzer options]
#
# Builds tests/fuzz/fuzz_ctl_msg.c with clang (-fsanitize=fuzzer,address,
# undefined) into $FUZZ_OUT (default build/fuzz), seeds the corpus with the
# valid and hostile messages of tests/unit/test_ctl_parse.c, runs for SECONDS
# (default 60) on $FUZZ_JOBS workers (default 1), then replays the corpus
# and any crash through test_ctl_parse. Exit status: 0 no crash, 1 a crash
# (its input is in $FUZZ_OUT/crashes/; replay it with
# `build/tests/test_ctl_parse FILE`), 2 usage or build failure.
set -euo pipefail

cd "$(dirname "$0")/../.."
secs=${1:-60}
[[ $# -gt 0 ]] && shift
[[ ${1:-} == -- ]] && shift
case $secs in
'' | *[!0-9]*) echo "usage: $0 [SECONDS] [-- libFuzzer options]" >&2; exit 2 ;;
esac

CLANG=${CLANG:-clang}
out=${FUZZ_OUT:-build/fuzz}
jobs=${FUZZ_JOBS:-1}
mkdir -p "$out/corpus" "$out/crashes"

flags=(-g -O1 -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Ickvfs)
if ! "$CLANG" "${flags[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	tests/fuzz/fuzz_ctl_msg.c ckvfs/ctl_msg.c -o "$out/fuzz_ctl_msg" -lm; then
	echo "$0: building the fuzzer failed (clang with libclang-rt installed?)" >&2
	exit 2
fi
"$CLANG" "${flags[@]}" -fsanitize=address,undefined -fno-sanitize-recover=undefined tests/unit/test_ctl_parse.c ckvfs/ctl_msg.c \
	-o "$out/test_ctl_parse" -lm || exit 2
"$out/test_ctl_parse" --write-corpus "$out/corpus" >/dev/null

rc=0
par=()
[[ $jobs -gt 1 ]] && par=(-jobs="$jobs" -workers="$jobs") # workers log to fuzz-N.log in $out
abs=$(cd "$out" && pwd)
(cd "$out" && ./fuzz_ctl_msg -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
	"${par[@]}" -print_final_stats=1 -artifact_prefix="$abs/crashes/" "$@" "$abs/corpus") || rc=1

"$out/test_ctl_parse" "$out/corpus" "$out/crashes" | tail -n 3 || rc=1
crashes=$(find "$out/crashes" -type f | wc -l)
echo "fuzz: corpus $(find "$out/corpus" -type f | wc -l) inputs, $crashes crash files in $out/crashes"
[[ $crashes -eq 0 && $rc -eq 0 ]]
