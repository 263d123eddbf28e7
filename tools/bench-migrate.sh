#!/bin/bash
# bench-migrate.sh — copying a cache into a ckvfs mount with the tools users
# know (rsync -a, cp -a) against the same copy into a plain directory on the
# same disk, side by side in one run (DESIGN §8).
#
#   tools/bench-migrate.sh [-t TOKENS] [-R REPEAT] [-P MS] [-d DIR] [-k]
#
#   -t TOKENS    tokens of the exported qwen2.5-7b cache (default 5000: 274 MiB)
#   -R REPEAT    repeat each measurement, report the median (default 5)
#   -P MS        the mount's publish_delay (default 1000, the daemon's default)
#   -d DIR       scratch directory, holding the store and the plain target
#                (default: a new one under /var/tmp, on the disk); -k keeps it
#
# Rows, MB/s of layer, token, sums and manifest bytes copied (ratio = mount
# / plain, so 1.00 is "as fast as a plain directory"):
#   warm source  wall time of rsync -a / cp -a alone, the source in the page
#                cache: both targets write into the page cache, so this is
#                CPU and memory copies only (the mount adds one copy per byte
#                and a round trip per request) — the hardest case
#   cold source  the same after drop_caches: the source is read from the disk,
#                as when caches arrive from another disk or machine
#   durable      warm source; plain: the tool, then sync; mount: the tool,
#                then until the cache is published (quiet period, every chunk
#                read back and checked, segment written and fsync'ed, index
#                committed)
# Each mount run starts from a store without the prefix (ckv rm, ckv gc).
# Needs root (drop_caches, mounting). Uses $CKV_BUILD/ckv and ckvfs.
set -euo pipefail

TOKENS=5000 REPEAT=5 DELAY=1000 DIR= KEEP=
while getopts "t:R:P:d:kh" o; do
	case $o in
	t) TOKENS=$OPTARG ;;
	R) REPEAT=$OPTARG ;;
	P) DELAY=$OPTARG ;;
	d) DIR=$OPTARG ;;
	k) KEEP=1 ;;
	h) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) exit 2 ;;
	esac
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${CKV_BUILD:-$SRC/build}
CKV=$BUILD/ckv
CKVFS=$BUILD/ckvfs
[ -x "$CKV" ] && [ -x "$CKVFS" ] || { echo "bench-migrate: build first (make)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "bench-migrate: needs root (drop_caches, mount)" >&2; exit 1; }
command -v rsync >/dev/null || { echo "bench-migrate: needs rsync" >&2; exit 1; }

if [ -z "$DIR" ]; then
	DIR=$(mktemp -d /var/tmp/ckv-bench-migrate.XXXXXX)
fi
mkdir -p "$DIR/mnt" "$DIR/plain"
MNT=$DIR/mnt
PID=

cleanup() {
	if grep -q " $MNT " /proc/self/mounts; then
		fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
	fi
	[ -n "$PID" ] && kill "$PID" 2>/dev/null || true
	[ -n "$KEEP" ] || rm -rf "$DIR"
}
trap cleanup EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
mbs() { awk -v b="$BYTES" -v t="$1" 'BEGIN { printf "%.1f", b / t / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

echo "bench-migrate: exporting a qwen2.5-7b cache of $TOKENS tokens in $DIR" >&2
"$CKV" init "$DIR/src" >/dev/null
HASH=$("$CKV" gen -q --no-sync "$DIR/src" --model qwen2.5-7b --tokens "$TOKENS" --seed 7)
mkdir -p "$DIR/ex"
"$CKV" export "$DIR/src" "$HASH" "$DIR/ex/$HASH" >/dev/null
rm -rf "$DIR/src"
BYTES=$(cat "$DIR/ex/$HASH"/* | wc -c)
MB=$(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1e6 }')
"$CKV" init "$DIR/dst" >/dev/null

"$CKVFS" "$DIR/dst" "$MNT" -f -o "publish_delay=$DELAY" 3>&- 2>>"$DIR/ckvfs.log" &
PID=$!
deadline=$((SECONDS + 10))
until grep -q " $MNT " /proc/self/mounts; do
	kill -0 "$PID" 2>/dev/null || { echo "bench-migrate: ckvfs died" >&2; cat "$DIR/ckvfs.log" >&2; exit 1; }
	[ $SECONDS -lt $deadline ] || { echo "bench-migrate: mount timed out" >&2; exit 1; }
	sleep 0.05
done

published() { [ "$(getfattr --only-values -n user.ckv.state "$MNT/by-hash/$HASH" 2>/dev/null)" = published ]; }
gone() { [ ! -e "$MNT/by-hash/$HASH" ]; }
wait_for() { # SECONDS CMD
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		[ $SECONDS -lt $deadline ] || { echo "bench-migrate: timed out waiting ($*)" >&2; exit 1; }
		sleep 0.01
	done
}
# A fresh start: nothing of the last run in the store, the page cache or the
# disk queue; SOURCE=warm reads the source into the page cache again.
reset() {
	rm -rf "$DIR/plain/$HASH"
	if [ -e "$MNT/by-hash/$HASH" ]; then
		"$CKV" rm "$DIR/dst" "$HASH" >/dev/null
		"$CKV" gc "$DIR/dst" >/dev/null
		wait_for 10 gone
	fi
	sync
	echo 3 >/proc/sys/vm/drop_caches
	[ "$1" = cold ] || cat "$DIR/ex/$HASH"/* >/dev/null
}
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; }

declare -A T
for tool in rsync cp; do
	for ((i = 0; i < REPEAT; i++)); do
		for src in warm cold; do
			reset "$src"
			t0=$(now)
			"$tool" -a "$DIR/ex/$HASH" "$DIR/plain/"
			t1=$(now)
			sync
			t2=$(now)
			T[$tool.p$src]+="$(elapsed "$t0" "$t1") "
			[ "$src" = cold ] || T[$tool.pdur]+="$(elapsed "$t0" "$t2") "

			reset "$src"
			t0=$(now)
			"$tool" -a "$DIR/ex/$HASH" "$MNT/by-hash/"
			t1=$(now)
			wait_for 120 published
			t2=$(now)
			T[$tool.m$src]+="$(elapsed "$t0" "$t1") "
			[ "$src" = cold ] || T[$tool.mdur]+="$(elapsed "$t0" "$t2") "
			cmp -s "$DIR/ex/$HASH/layer_013.kv" "$MNT/by-hash/$HASH/layer_013.kv" ||
				{ echo "bench-migrate: published copy differs" >&2; exit 1; }
		done
	done
done
fusermount3 -u "$MNT"
wait "$PID" 2>/dev/null || true
PID=

med() { printf '%s\n' ${T[$1]} | median; }
echo
echo "ckvfs migration benchmark — $(uname -n), $(nproc) cores, kernel $(uname -r), $(df -T "$DIR" | awk 'NR == 2 { print $2 }') at $DIR"
echo "cache: qwen2.5-7b, $TOKENS tokens, 31 files, $MB MB; publish_delay $DELAY ms; medians of $REPEAT runs"
printf '%-52s %11s %11s %6s\n' "measurement" "mount MB/s" "plain MB/s" "ratio"
for tool in rsync cp; do
	for what in warm cold dur; do
		m=$(med "$tool.m$what") p=$(med "$tool.p$what")
		case $what in
		warm) label="$tool -a, warm source: tool wall time" ;;
		cold) label="$tool -a, cold source: tool wall time" ;;
		dur) label="$tool -a, durable (plain: +sync; mount: published)" ;;
		esac
		printf '%-52s %11s %11s %6s\n' "$label" "$(mbs "$m")" "$(mbs "$p")" "$(ratio "$p" "$m")"
	done
done
