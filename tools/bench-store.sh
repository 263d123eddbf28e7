#!/bin/bash
# Store benchmark, one run, ratios side by side on the same disk:
#   1. import throughput vs `cp -r` (+ sync) of the same exported cache
#   2. `ckv match` on a store of N prefixes sharing a long trunk
#
#   tools/bench-store.sh [-t TOKENS] [-m MODEL] [-n NPREFIX] [-d DIR]
# Defaults: qwen2.5-7b, 8192 tokens (448 MiB), 10000 prefixes, DIR=./build/bench.
# Drops the page cache between runs when run as root.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
B=${CKV_BUILD:-$top/build}
CKV="$B/ckv"
TOKENS=8192 MODEL=qwen2.5-7b NPREFIX=10000 DIR="$top/build/bench" REPS=3
while getopts "t:m:n:d:r:h" o; do
	case $o in
	t) TOKENS=$OPTARG ;; m) MODEL=$OPTARG ;; n) NPREFIX=$OPTARG ;; d) DIR=$OPTARG ;; r) REPS=$OPTARG ;;
	*) sed -n '2,9p' "$0"; exit 2 ;;
	esac
done

now() { date +%s.%N; }
drop() { sync; [ "$(id -u)" -eq 0 ] && echo 3 > /proc/sys/vm/drop_caches || true; }
rm -rf "$DIR"; mkdir -p "$DIR"

echo "# ckvfs store benchmark — $(date -u +%F) — $(nproc) cores, $(df -h "$DIR" | awk 'NR==2{print $1}') ($(stat -f -c %T "$DIR"))"
"$CKV" init "$DIR/src" >/dev/null
H=$("$CKV" gen -q "$DIR/src" --model "$MODEL" --tokens "$TOKENS")
"$CKV" export "$DIR/src" "$H" "$DIR/cache"
bytes=$(du -sb "$DIR/cache" | cut -f1)

best_cp=999999 best_imp=999999
for r in $(seq "$REPS"); do
	rm -rf "$DIR/cp" "$DIR/dst"; "$CKV" init "$DIR/dst" >/dev/null; drop
	t0=$(now); cp -r "$DIR/cache" "$DIR/cp"; sync; t1=$(now)
	drop
	t2=$(now); "$CKV" import -q "$DIR/dst" "$DIR/cache" >/dev/null; t3=$(now)
	best_cp=$(echo "$t1 - $t0" | bc -l | awk -v b="$best_cp" '{ if ($1 < b) print $1; else print b }')
	best_imp=$(echo "$t3 - $t2" | bc -l | awk -v b="$best_imp" '{ if ($1 < b) print $1; else print b }')
done
printf '\n| %-48s | %10s | %10s |\n' "import of $MODEL, $TOKENS tokens" "seconds" "MB/s"
printf '|%s|%s|%s|\n' "--------------------------------------------------" "------------" "------------"
printf '| %-48s | %10.3f | %10.0f |\n' "cp -r + sync" "$best_cp" "$(echo "$bytes / $best_cp / 1000000" | bc -l)"
printf '| %-48s | %10.3f | %10.0f |\n' "ckv import (hash, sums, digests, key copy, fsync)" "$best_imp" "$(echo "$bytes / $best_imp / 1000000" | bc -l)"
printf '\nimport / cp throughput ratio: %.2f (best of %d, %s bytes)\n' "$(echo "$best_cp / $best_imp" | bc -l)" "$REPS" "$bytes"

# match on a store of NPREFIX prefixes: one 32768-token trunk, NPREFIX children of +16 tokens
"$CKV" init "$DIR/many" >/dev/null
T=$("$CKV" gen -q "$DIR/many" --model-id bench/tiny --layers 2 --kv-heads 1 --head-dim 64 --tokens 32768 --no-sync)
t0=$(now)
"$CKV" gen -q "$DIR/many" --extends "$T" --tokens 16 --count "$((NPREFIX - 1))" --seed 100 --no-sync > "$DIR/children"
t1=$(now)
child=$(sed -n "$((NPREFIX / 2))p" "$DIR/children")
"$CKV" export "$DIR/many" "$child" "$DIR/q" >/dev/null
cp "$DIR/q/tokens.bin" "$DIR/query.bin"; head -c 4000 /dev/urandom >> "$DIR/query.bin"
n=$("$CKV" ls "$DIR/many" | wc -l)
runs=50
t2=$(now)
for i in $(seq $runs); do "$CKV" match "$DIR/many" --model-id bench/tiny --layers 2 --kv-heads 1 --head-dim 64 --tokens "$DIR/query.bin" >/dev/null; done
t3=$(now)
out=$("$CKV" match "$DIR/many" --model-id bench/tiny --layers 2 --kv-heads 1 --head-dim 64 --tokens "$DIR/query.bin" | head -1)
t4=$(now)
for i in $(seq $runs); do "$CKV" -V >/dev/null; done
t5=$(now)
printf '\nmatch on a store of %s prefixes (query of %s tokens): %s\n' "$n" "$(( $(stat -c %s "$DIR/query.bin") / 4 ))" "$out"
printf '  ckv match: %.2f ms per call (process start, index open, chain hash, look-ups); ckv -V alone: %.2f ms\n' \
	"$(echo "($t3 - $t2) * 1000 / $runs" | bc -l)" "$(echo "($t5 - $t4) * 1000 / $runs" | bc -l)"
printf '  publishing the %s children took %.1f s (%.2f ms each, --no-sync)\n' "$((NPREFIX - 1))" \
	"$(echo "$t1 - $t0" | bc -l)" "$(echo "($t1 - $t0) * 1000 / ($NPREFIX - 1)" | bc -l)"
printf '  index size: %s\n' "$(du -sh "$DIR/many/index" | cut -f1)"
rm -rf "$DIR"
