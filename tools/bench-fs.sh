#!/bin/bash
# bench-fs.sh — FUSE read throughput of ckvfs against direct reads of the
# backing segment files, measured side by side in one run (DESIGN §8).
#
#   tools/bench-fs.sh [-t TOKENS] [-n PREFIXES] [-r READS] [-j THREADS] [-d DIR] [-R REPEAT] [-k]
#
#   -t TOKENS    tokens of the qwen2.5-7b prefix read back (default 16384: ~0.9 GiB)
#   -n PREFIXES  prefixes of the readdir store (default 10000; 0 skips it)
#   -r READS     random 32 KiB reads per random-read run (default 8192)
#   -j THREADS   reader threads for random reads (default 16)
#   -R REPEAT    repeat each measurement, report the median (default 3)
#   -d DIR       scratch directory (default: a new one under /tmp); -k keeps it
#
# Rows (each a ratio to its baseline, MB/s both sides):
#   seq cold   every layer file read once with dd bs=1M through a fresh mount
#              after drop_caches, vs dd iflag=direct bs=1M of the segment files
#   seq warm   the same read again on the same mount (arena / page cache)
#   random     32 KiB chunk-aligned preads from THREADS threads, cold mount,
#              vs the same offsets read with O_DIRECT from the segment files
#   readdir    `ls by-hash | wc -l` on a store of PREFIXES prefixes (seconds)
# for both modes: the default (page cache, keep_cache) and -o direct_io.
# Needs root (drop_caches, mounting). Uses $CKV_BUILD/ckv and ckvfs.
set -euo pipefail

TOKENS=16384 NPFX=10000 READS=8192 THREADS=16 REPEAT=3 DIR= KEEP=
while getopts "t:n:r:j:R:d:kh" o; do
	case $o in
	t) TOKENS=$OPTARG ;;
	n) NPFX=$OPTARG ;;
	r) READS=$OPTARG ;;
	j) THREADS=$OPTARG ;;
	R) REPEAT=$OPTARG ;;
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
PY=${PY:-/usr/bin/python3}
[ -x "$CKV" ] && [ -x "$CKVFS" ] || { echo "bench-fs: build first (make)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "bench-fs: needs root (drop_caches, mount)" >&2; exit 1; }

if [ -z "$DIR" ]; then
	DIR=$(mktemp -d /tmp/ckv-bench-fs.XXXXXX)
fi
mkdir -p "$DIR/mnt"
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

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }

mount_fs() { # STORE OPTS
	"$CKVFS" "$1" "$MNT" -f -o "$2" 3>&- 2>>"$DIR/ckvfs.log" &
	PID=$!
	local deadline=$((SECONDS + 10))
	until grep -q " $MNT " /proc/self/mounts; do
		kill -0 "$PID" 2>/dev/null || { echo "bench-fs: ckvfs died" >&2; cat "$DIR/ckvfs.log" >&2; exit 1; }
		[ $SECONDS -lt $deadline ] || { echo "bench-fs: mount timed out" >&2; exit 1; }
		sleep 0.05
	done
	ls "$MNT/by-hash" >/dev/null
	sleep 0.6 # the daemon raises the mount's read-ahead window after init
}
umount_fs() {
	fusermount3 -u "$MNT"
	wait "$PID" 2>/dev/null || true
	PID=
}

median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

# The random-read helper: READS preads of 32 KiB at chunk-aligned offsets of
# the given files from THREADS threads; O_DIRECT when asked. Prints MB/s.
cat >"$DIR/rand.py" <<'EOF'
import mmap, os, random, sys, threading, time
direct, reads, threads, chunk = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = sys.argv[5:]
flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
fds = [os.open(f, flags) for f in files]
sizes = [os.fstat(fd).st_size // chunk for fd in fds]
rng = random.Random(42)
work = [(rng.randrange(len(fds)),) for _ in range(reads)]
work = [(i, rng.randrange(sizes[i]) * chunk) for (i,) in work]
per = [work[t::threads] for t in range(threads)]
def run(items):
    buf = mmap.mmap(-1, chunk)
    for i, off in items:
        if os.preadv(fds[i], [buf], off) != chunk:
            raise SystemExit("short read")
ts = [threading.Thread(target=run, args=(p,)) for p in per]
t0 = time.monotonic()
for t in ts: t.start()
for t in ts: t.join()
dt = time.monotonic() - t0
print("%.1f" % (reads * chunk / dt / 1e6))
EOF

echo "bench-fs: building a qwen2.5-7b store of $TOKENS tokens in $DIR" >&2
"$CKV" init "$DIR/store" >/dev/null
HASH=$("$CKV" gen -q --no-sync "$DIR/store" --model qwen2.5-7b --tokens "$TOKENS" --seed 7)
SEGFILES=$(ls "$DIR"/store/seg/*/*/layer_*.kv)
BYTES=$(cat $SEGFILES | wc -c)
MB=$(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1e6 }')
CHUNK=32768

seq_direct() {
	drop
	local t0 t1
	t0=$(now)
	for f in $SEGFILES; do dd if="$f" of=/dev/null bs=1M iflag=direct status=none; done
	t1=$(now)
	awk -v b="$BYTES" -v a="$t0" -v c="$t1" 'BEGIN { printf "%.1f", b / (c - a) / 1e6 }'
}
seq_mount() { # prints "cold warm"
	local t0 t1 t2
	t0=$(now)
	for l in "$MNT/by-hash/$HASH"/layer_*.kv; do dd if="$l" of=/dev/null bs=1M status=none; done
	t1=$(now)
	for l in "$MNT/by-hash/$HASH"/layer_*.kv; do dd if="$l" of=/dev/null bs=1M status=none; done
	t2=$(now)
	awk -v b="$BYTES" -v a="$t0" -v m="$t1" -v c="$t2" \
		'BEGIN { printf "%.1f %.1f", b / (m - a) / 1e6, b / (c - m) / 1e6 }'
}

declare -A R
for mode in page_cache direct_io; do
	opts=cache=4G
	[ "$mode" = direct_io ] && opts=$opts,direct_io
	base=() cold=() warm=() rbase=() rmnt=()
	for ((i = 0; i < REPEAT; i++)); do
		base+=("$(seq_direct)")
		drop
		mount_fs "$DIR/store" "$opts"
		read -r c w <<<"$(seq_mount)"
		cold+=("$c") warm+=("$w")
		umount_fs
		drop
		rbase+=("$("$PY" "$DIR/rand.py" 1 "$READS" "$THREADS" "$CHUNK" $SEGFILES)")
		drop
		mount_fs "$DIR/store" "$opts"
		rmnt+=("$("$PY" "$DIR/rand.py" 0 "$READS" "$THREADS" "$CHUNK" "$MNT/by-hash/$HASH"/layer_*.kv)")
		umount_fs
	done
	R[$mode.base]=$(printf '%s\n' "${base[@]}" | median)
	R[$mode.cold]=$(printf '%s\n' "${cold[@]}" | median)
	R[$mode.warm]=$(printf '%s\n' "${warm[@]}" | median)
	R[$mode.rbase]=$(printf '%s\n' "${rbase[@]}" | median)
	R[$mode.rmnt]=$(printf '%s\n' "${rmnt[@]}" | median)
done

LS1=- LS2=-
if [ "$NPFX" -gt 0 ]; then
	echo "bench-fs: generating $NPFX small prefixes" >&2
	"$CKV" init "$DIR/store10k" >/dev/null
	"$CKV" gen --no-sync "$DIR/store10k" --model qwen2.5-0.5b --tokens 16 --count "$NPFX" --seed 1 >/dev/null
	drop
	mount_fs "$DIR/store10k" cache=64M
	t0=$(now)
	n=$(ls "$MNT/by-hash" | wc -l)
	t1=$(now)
	ls "$MNT/by-hash" | wc -l >/dev/null
	t2=$(now)
	umount_fs
	[ "$n" -eq "$NPFX" ] || echo "bench-fs: listed $n of $NPFX prefixes" >&2
	LS1=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
	LS2=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3f", b - a }')
fi

echo
echo "ckvfs read benchmark — $(uname -n), $(nproc) cores, kernel $(uname -r)"
echo "prefix: qwen2.5-7b, $TOKENS tokens, 28 layer files, $MB MB; medians of $REPEAT runs"
printf '%-34s %12s %12s %8s\n' "measurement" "mount MB/s" "base MB/s" "ratio"
for mode in page_cache direct_io; do
	printf '%-34s %12s %12s %8s\n' "seq cold ($mode)" "${R[$mode.cold]}" "${R[$mode.base]}" \
		"$(ratio "${R[$mode.cold]}" "${R[$mode.base]}")"
	printf '%-34s %12s %12s %8s\n' "seq warm ($mode)" "${R[$mode.warm]}" "${R[$mode.base]}" \
		"$(ratio "${R[$mode.warm]}" "${R[$mode.base]}")"
	printf '%-34s %12s %12s %8s\n' "random 32K x$THREADS thr ($mode)" "${R[$mode.rmnt]}" \
		"${R[$mode.rbase]}" "$(ratio "${R[$mode.rmnt]}" "${R[$mode.rbase]}")"
done
printf '%-34s %12s\n' "ls by-hash | wc -l, $NPFX prefixes" "${LS1}s cold, ${LS2}s again"
