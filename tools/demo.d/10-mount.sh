# Sourced by tools/demo.sh (STORE, child, parent, B, CKV, step() in scope):
# mount the demo store, browse it, give a hint, read it back, unmount.
MNT="$top/demo/mnt"
mkdir -p "$MNT"
if [ ! -e /dev/fuse ] || ! command -v fusermount3 >/dev/null; then
	step "mount: skipped (no /dev/fuse or fusermount3 here)"
	return 0
fi
step "ckvfs $STORE $MNT -o cache=256M"
"$B/ckvfs" "$STORE" "$MNT" -o cache=256M 3>&-
trap 'fusermount3 -u "$MNT" 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q " $MNT " /proc/self/mounts && break; sleep 0.05; done

step "the tree (by-hash, by-model, import, .ckv)"
if command -v tree >/dev/null; then
	tree -L 3 --noreport "$MNT" | sed -e 's/\(layer_00[2-9].kv\|layer_0[1-9][0-9].kv\)$/…/' | uniq
else
	find "$MNT" -maxdepth 3 | sort
fi

step "a manifest, read by path"
cat "$MNT/by-hash/$child/manifest.json"
ls -l "$MNT/by-hash/$child" | head -5

step "byte-identical to ckv export"
cmp "$MNT/by-hash/$child/layer_000.kv" "$top/demo/export/layer_000.kv" && echo "layer_000.kv: identical"

step "a read-ahead hint: chunks 0, 100-119 and 319 of layer 5, then read them"
setfattr -n user.ckv.willneed -v "0,100-119,319" "$MNT/by-hash/$child/layer_005.kv"
sleep 0.2
echo "resident: $(getfattr --only-values -n user.ckv.resident "$MNT/by-hash/$child/layer_005.kv" 2>/dev/null)"
setfattr -n user.ckv.scores -v "100:5.0,101:4.5,319:1.0" "$MNT/by-hash/$child/layer_005.kv"
dd if="$MNT/by-hash/$child/layer_005.kv" bs=8192 skip=100 count=20 status=none of=/dev/null

step "stats (.ckv/stats)"
cat "$MNT/.ckv/stats"

step "unmount (retention state is saved in the store)"
fusermount3 -u "$MNT"
trap - EXIT
