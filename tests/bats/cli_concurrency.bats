#!/usr/bin/env bats
# Several ckv processes on one store at once.

load test_helper

setup_file() {
	local F=$BATS_FILE_TMPDIR i h
	"$CKV" init "$F/src"
	for i in 1 2 3 4; do
		h=$(gen_hash "$F/src" -m qwen2.5-0.5b -n 3000 --seed "$i")
		echo "$h" >"$F/c$i.hash"
		"$CKV" export "$F/src" "$h" "$F/c$i"
	done
	rm -rf "$F/src"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
}

# start_import STORE DIR OUT: ckv import in the background; pid appended to PIDS
start_import() {
	"$CKV" import -q "$1" "$2" >"$3" 2>"$3.err" 3>&- &
	PIDS+=("$!")
}

# wait_all: every background import exited 0
wait_all() {
	local p st bad=0
	for p in "${PIDS[@]}"; do
		st=0
		wait "$p" || st=$?
		[ "$st" -eq 0 ] || { echo "# pid $p exited $st"; bad=1; }
	done
	PIDS=()
	[ "$bad" -eq 0 ]
}

@test "concurrency: four imports of different caches into one store all succeed" {
	"$CKV" init "$T/s"
	PIDS=()
	for i in 1 2 3 4; do
		start_import "$T/s" "$F/c$i" "$T/out$i"
	done
	wait_all || fail "an import failed: $(cat "$T"/out*.err)"
	for i in 1 2 3 4; do
		assert_equal "$(cat "$T/out$i")" "$(cat "$F/c$i.hash")"
		[ ! -s "$T/out$i.err" ] || fail "stderr of import $i: $(cat "$T/out$i.err")"
	done
	run -0 "$CKV" ls "$T/s"
	[ "${#lines[@]}" -eq 4 ]
	for i in 1 2 3 4; do
		assert_output_contains "$(cat "$F/c$i.hash")"
	done
	run -0 "$CKV" verify "$T/s"
	assert_equal "$output" ok
	staging_empty "$T/s"
	[ "$(seg_count "$T/s")" -eq 4 ]
	for i in 1 2 3 4; do
		"$CKV" export "$T/s" "$(cat "$F/c$i.hash")" "$T/e$i"
		assert_same_dir "$F/c$i" "$T/e$i"
	done
	run -0 "$CKV" gc "$T/s"
	assert_output_contains "removed 0 segments, 0 staging areas, 0 stray records"
}

@test "concurrency: two imports of the same cache both succeed; the store holds it once" {
	H=$(cat "$F/c1.hash")
	for round in 1 2 3; do
		S=$T/s$round
		"$CKV" init "$S"
		PIDS=()
		start_import "$S" "$F/c1" "$T/a$round"
		start_import "$S" "$F/c1" "$T/b$round"
		wait_all || fail "round $round: $(cat "$T/a$round.err" "$T/b$round.err")"
		assert_equal "$(cat "$T/a$round")" "$H"
		assert_equal "$(cat "$T/b$round")" "$H"
		run -0 "$CKV" ls "$S"
		[ "${#lines[@]}" -eq 1 ]
		assert_output_contains "$H"
		[ "$(seg_count "$S")" -eq 1 ]
		[ "$(find "$S/prefix" -type f | wc -l)" -eq 1 ]
		staging_empty "$S"
		run -0 "$CKV" verify "$S"
		# the record on disk is the one the index holds: a rebuilt index answers the same
		before=$("$CKV" stat "$S" "$H" --json)
		assert_equal "$(jq -c '.extents' "$S/prefix/${H:0:2}/$H.json")" "$(jq -c '.extents' <<<"$before")"
		run -0 "$CKV" reindex "$S"
		assert_equal "$("$CKV" stat "$S" "$H" --json)" "$before"
		run -0 "$CKV" gc "$S"
		assert_output_contains "removed 0 segments, 0 staging areas, 0 stray records"
		"$CKV" export "$S" "$H" "$T/e$round"
		assert_same_dir "$F/c1" "$T/e$round"
		rm -rf "$S"
	done
}

@test "concurrency: gc, verify and ls while imports run" {
	"$CKV" init "$T/s"
	PIDS=()
	for i in 1 2 3 4; do
		start_import "$T/s" "$F/c$i" "$T/out$i"
	done
	# readers and a gc racing the imports must neither fail nor break them
	for _ in 1 2 3; do
		run -0 "$CKV" ls "$T/s"
		run -0 "$CKV" gc "$T/s"
		run -0 "$CKV" verify "$T/s"
	done
	wait_all || fail "an import failed: $(cat "$T"/out*.err)"
	run -0 "$CKV" ls "$T/s"
	[ "${#lines[@]}" -eq 4 ]
	run -0 "$CKV" verify "$T/s"
	run -0 "$CKV" gc "$T/s"
	assert_output_contains "removed 0 segments, 0 staging areas, 0 stray records"
	[ "$(seg_count "$T/s")" -eq 4 ]
}

@test "concurrency: a parent and its child (twice) imported at once, all whole" {
	"$CKV" init "$T/src"
	p=$(gen_hash "$T/src" -m qwen2.5-0.5b -n 3000 --seed 1)
	assert_equal "$p" "$(cat "$F/c1.hash")"
	c=$(gen_hash "$T/src" --extends "$p" -n 1000)
	"$CKV" export "$T/src" "$c" "$T/child"
	for round in 1 2 3 4 5; do
		S=$T/s$round
		"$CKV" init "$S"
		PIDS=()
		start_import "$S" "$F/c1" "$T/p$round"
		start_import "$S" "$T/child" "$T/c$round"
		start_import "$S" "$T/child" "$T/d$round"
		wait_all || fail "round $round: $(cat "$T/p$round.err" "$T/c$round.err" "$T/d$round.err")"
		run -0 "$CKV" ls "$S"
		[ "${#lines[@]}" -eq 2 ]
		run -0 "$CKV" verify "$S"
		# the two child imports may have deduplicated differently; the record
		# file must say what the index says, or gc + reindex would lose the child
		for h in "$p" "$c"; do
			assert_equal "$(jq -c .extents "$S/prefix/${h:0:2}/$h.json")" \
				"$("$CKV" stat "$S" "$h" --json | jq -c .extents)"
		done
		run -0 "$CKV" gc "$S"
		run -0 "$CKV" reindex "$S"
		assert_equal "$output" "indexed 2 prefixes"
		"$CKV" export "$S" "$c" "$T/ec$round"
		assert_same_dir "$T/child" "$T/ec$round"
		"$CKV" export "$S" "$p" "$T/ep$round"
		assert_same_dir "$F/c1" "$T/ep$round"
		run -0 "$CKV" gc "$S"
		staging_empty "$S"
		run -0 "$CKV" verify "$S"
		rm -rf "$S" "$T/ec$round" "$T/ep$round"
	done
}

@test "concurrency: two imports of one prefix that deduplicate differently" {
	# A starts on an empty store: nothing to share, it writes all 190 chunks.
	# A is paused mid-write; the parent goes in, then B, which shares the
	# parent's 187 chunks and commits first. A resumes and finds the prefix
	# stored: it must not leave a record file that says other than the index.
	"$CKV" init "$T/src"
	p=$(gen_hash "$T/src" -m qwen2.5-0.5b -n 3000 --seed 1)
	c=$(gen_hash "$T/src" --extends "$p" -n 30)
	"$CKV" export "$T/src" "$c" "$T/child"
	rm -rf "$T/src"
	shopt -s nullglob
	raced=0
	for round in 1 2 3 4 5 6; do
		S=$T/s$round
		"$CKV" init "$S"
		"$CKV" import -q "$S" "$T/child" >"$T/a$round" 2>&1 3>&- &
		pa=$!
		# pause A while its segment is being written (before its rename and commit)
		stopped=0
		while kill -0 "$pa" 2>/dev/null; do
			w=("$S"/staging/*/seg)
			if [ "${#w[@]}" -gt 0 ]; then
				kill -STOP "$pa"
				w=("$S"/staging/*/seg)
				[ "${#w[@]}" -gt 0 ] && stopped=1
				[ "$stopped" -eq 1 ] || kill -CONT "$pa"
				break
			fi
		done
		if [ "$stopped" -eq 1 ]; then
			run -0 timeout 60 "$CKV" import -q "$S" "$F/c1"
			run -0 timeout 60 "$CKV" import "$S" "$T/child"
			assert_output_contains "shared chunks 187"
			kill -CONT "$pa"
			raced=$((raced + 1))
		fi
		st=0
		wait "$pa" || st=$?
		[ "$st" -eq 0 ] || fail "round $round: import A exited $st: $(cat "$T/a$round")"
		assert_equal "$(cat "$T/a$round")" "$c"
		[ "$stopped" -eq 1 ] || { rm -rf "$S"; continue; }
		for h in "$p" "$c"; do
			assert_equal "$(jq -c .extents "$S/prefix/${h:0:2}/$h.json")" \
				"$("$CKV" stat "$S" "$h" --json | jq -c .extents)"
		done
		run -0 "$CKV" gc "$S"
		run -0 "$CKV" reindex "$S"
		assert_equal "$output" "indexed 2 prefixes"
		run -0 "$CKV" verify "$S"
		"$CKV" export "$S" "$c" "$T/ec$round"
		assert_same_dir "$T/child" "$T/ec$round"
		rm -rf "$S" "$T/ec$round"
		[ "$raced" -lt 2 ] || break
	done
	echo "# $raced rounds paused A mid-write"
	[ "$raced" -ge 1 ]
}
