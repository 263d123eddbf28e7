#!/usr/bin/env bats
# Crash safety: an import killed at any point leaves the store as it was
# (or, past the commit, with the prefix complete); gc removes the leftovers
# and the import can be run again.

load test_helper

setup_file() {
	local F=$BATS_FILE_TMPDIR p c
	# base store: a parent prefix
	"$CKV" init "$F/base"
	p=$(gen_hash "$F/base" -m qwen2.5-0.5b -n 1000 --seed 5)
	echo "$p" >"$F/p.hash"
	# the cache to import: a child of the parent (62 chunks shared, 32 new)
	"$CKV" init "$F/src"
	gen_hash "$F/src" -m qwen2.5-0.5b -n 1000 --seed 5 >/dev/null
	c=$(gen_hash "$F/src" --extends "$p" -n 500)
	echo "$c" >"$F/c.hash"
	"$CKV" export "$F/src" "$c" "$F/child"
	rm -rf "$F/src"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
	P=$(cat "$F/p.hash")
	C=$(cat "$F/c.hash")
}

# after_crash STORE HASH: the store verifies; HASH is either absent or
# complete; prints "present" or "absent"
after_crash() {
	local s=$1 h=$2
	run -0 "$CKV" verify "$s"
	run -0 "$CKV" ls "$s"
	if [[ "$output" == *"$h"* ]]; then
		run -0 "$CKV" verify "$s" "$h"
		rm -rf "$T/chk"
		"$CKV" export "$s" "$h" "$T/chk" || fail "$h listed but does not export"
		assert_same_dir "$T/chk" "$F/child"
		rm -rf "$T/chk"
		state=present
	else
		run -1 "$CKV" stat "$s" "$h"
		run -1 "$CKV" export "$s" "$h" "$T/chk"
		[ ! -e "$T/chk/manifest.json" ]
		rm -rf "$T/chk"
		state=absent
	fi
}

@test "crash: CKV_CRASH_AT=staging|segment|record|manifest|commit, then verify, gc, import again" {
	for stage in staging segment record manifest commit; do
		echo "# stage $stage"
		S=$T/s-$stage
		cp -a "$F/base" "$S"
		run env CKV_CRASH_AT=$stage "$CKV" import -q "$S" "$F/child"
		[ "$status" -eq 137 ] || fail "$stage: expected SIGKILL (137), got $status: $output"
		# the crash left something behind, so the stage was really reached
		[ -n "$(ls -A "$S/staging")" ] || fail "$stage: nothing in staging/"
		after_crash "$S" "$C"
		if [ "$stage" = commit ]; then
			[ "$state" = present ] || fail "$stage: prefix not published"
		else
			[ "$state" = absent ] || fail "$stage: prefix visible before its commit"
		fi
		# the parent is untouched
		run -0 "$CKV" verify "$S" "$P"
		run -0 --separate-stderr "$CKV" gc "$S"
		echo "# gc: $output"
		case $stage in
		staging | segment) assert_output_contains "removed 0 segments, 1 staging areas, 0 stray records" ;;
		record | manifest) assert_output_contains "removed 1 segments, 1 staging areas, 1 stray records" ;;
		commit) assert_output_contains "removed 0 segments, 1 staging areas, 0 stray records" ;;
		esac
		staging_empty "$S"
		# nothing unreferenced is left: one segment per stored extent
		nseg=$(seg_count "$S")
		[ "$nseg" -eq $([ "$state" = present ] && echo 2 || echo 1) ] || fail "$stage: $nseg segments"
		[ "$(find "$S/prefix" -type f | wc -l)" -eq $([ "$state" = present ] && echo 2 || echo 1) ]
		run -0 "$CKV" verify "$S"
		# the import runs again and the prefix exports byte-identically
		run -0 "$CKV" import "$S" "$F/child"
		if [ "$state" = present ]; then
			assert_output_contains "already stored"
		else
			assert_output_contains "new chunks 32  shared chunks 62"
		fi
		"$CKV" export "$S" "$C" "$T/out-$stage"
		assert_same_dir "$F/child" "$T/out-$stage"
		run -0 "$CKV" verify "$S"
		[ "$(seg_count "$S")" -eq 2 ]
		rm -rf "$S" "$T/out-$stage"
	done
}

@test "crash: an import run again right after a crash, before any gc, succeeds" {
	for stage in staging segment record manifest commit; do
		echo "# stage $stage"
		S=$T/s-$stage
		cp -a "$F/base" "$S"
		run env CKV_CRASH_AT=$stage "$CKV" import -q "$S" "$F/child"
		[ "$status" -eq 137 ]
		run -0 "$CKV" import -q "$S" "$F/child"
		assert_equal "$output" "$C"
		"$CKV" export "$S" "$C" "$T/out"
		assert_same_dir "$F/child" "$T/out"
		run -0 "$CKV" verify "$S"
		run -0 "$CKV" gc "$S"
		assert_output_contains "removed 0 segments"
		staging_empty "$S"
		[ "$(seg_count "$S")" -eq 2 ]
		run -0 "$CKV" verify "$S"
		rm -rf "$S" "$T/out"
	done
}

@test "crash: ckv gen killed at each stage leaves a consistent store" {
	for stage in staging segment record manifest commit; do
		S=$T/g-$stage
		cp -a "$F/base" "$S"
		run env CKV_CRASH_AT=$stage "$CKV" gen -q "$S" --extends "$P" -n 500
		[ "$status" -eq 137 ] || fail "$stage: got $status"
		run -0 "$CKV" verify "$S"
		run -0 "$CKV" ls "$S"
		if [ "$stage" = commit ]; then
			[ "${#lines[@]}" -eq 2 ]
		else
			[ "${#lines[@]}" -eq 1 ]
		fi
		run -0 "$CKV" gc "$S"
		staging_empty "$S"
		run -0 "$CKV" gen -q "$S" --extends "$P" -n 500
		assert_equal "$output" "$C"
		"$CKV" export "$S" "$C" "$T/out"
		assert_same_dir "$F/child" "$T/out"
		rm -rf "$S" "$T/out"
	done
}

@test "crash: kill -9 at random points of a large import (qwen2.5-7b shape)" {
	"$CKV" init "$T/src"
	h=$(gen_hash "$T/src" -m qwen2.5-7b -n 2000 --seed 42)
	"$CKV" export "$T/src" "$h" "$T/big"
	rm -rf "$T/src"
	# how long an uninterrupted import takes here: the faster of two (the
	# first reads a cold page cache; the runs below read a warm one)
	dur_ms=999999
	for r in 1 2; do
		"$CKV" init "$T/ref"
		t0=$(date +%s%N)
		"$CKV" import -q "$T/ref" "$T/big" >/dev/null
		d=$((($(date +%s%N) - t0) / 1000000))
		[ "$d" -lt "$dur_ms" ] && dur_ms=$d
		rm -rf "$T/ref"
	done
	echo "# full import: ${dur_ms} ms"
	killed=0
	RANDOM=$$
	for i in 1 2 3 4 5 6; do
		S=$T/s$i
		cp -a "$F/base" "$S"
		before=$(store_snapshot "$S")
		# kill somewhere in 2% .. 111% of the import (late ones may land after
		# the commit); the first run early, so that at least one lands inside
		delay=$((dur_ms * (2 + RANDOM % 110) / 100))
		[ "$i" -eq 1 ] && delay=$((dur_ms / 10))
		"$CKV" import -q "$S" "$T/big" >/dev/null 2>&1 3>&- &
		pid=$!
		sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
		kill -9 "$pid" 2>/dev/null || echo "# run $i: the import had finished"
		st=0
		wait "$pid" || st=$?
		echo "# run $i: killed after ${delay} ms, exit $st"
		[ "$st" -eq 137 ] || [ "$st" -eq 0 ] || fail "import exited $st"
		[ "$st" -eq 137 ] && killed=$((killed + 1))
		run -0 "$CKV" verify "$S"
		run -0 "$CKV" verify "$S" "$P"
		run -0 "$CKV" ls "$S"
		if [[ "$output" == *"$h"* ]]; then
			[ "${#lines[@]}" -eq 2 ]
			run -0 "$CKV" verify "$S" "$h"
		else
			[ "${#lines[@]}" -eq 1 ]
			run -1 "$CKV" stat "$S" "$h"
		fi
		run -0 "$CKV" gc "$S"
		staging_empty "$S"
		# without the new prefix, gc brings back exactly the store as it was
		if [[ "$("$CKV" ls "$S")" != *"$h"* ]]; then
			assert_equal "$(store_snapshot "$S")" "$before"
		fi
		run -0 "$CKV" import -q "$S" "$T/big"
		assert_equal "$output" "$h"
		"$CKV" export "$S" "$h" "$T/out"
		assert_same_dir "$T/big" "$T/out"
		run -0 "$CKV" verify "$S"
		rm -rf "$S" "$T/out"
	done
	echo "# $killed of 6 runs killed mid-import"
	[ "$killed" -ge 1 ]
}
