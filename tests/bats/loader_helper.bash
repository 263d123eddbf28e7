# Helpers of the loader bats tests (tests/bats/loader*.bats): `load loader_helper`
# after test_helper.

# loader_so DIR: print the path of a libckvgpu.so over $CKV_BUILD's archives,
# $CKV_BUILD/libckvgpu.so when the Makefile made one, else linked into DIR
# (the same link line the Makefile's target uses: docs/LOADER.md).
loader_so() {
	local dir=$1 so libs san="" cuda=${CUDA_HOME:-/usr/local/cuda}
	if [ -f "$CKV_BUILD/libckvgpu.so" ] && ! [ "$CKV_BUILD/libckvgpu.a" -nt "$CKV_BUILD/libckvgpu.so" ]; then
		echo "$CKV_BUILD/libckvgpu.so"
		return 0
	fi
	so="$dir/libckvgpu.so"
	libs="$(pkg-config --libs liburing lmdb libxxhash jansson) -lm -pthread"
	if nm "$CKV_BUILD/libckvgpu.a" 2>/dev/null | grep -q cudaLaunchKernel; then
		libs="$libs -L$cuda/lib64 -Wl,-rpath,$cuda/lib64 -lcudart -lstdc++"
	fi
	if nm "$CKV_BUILD/libckvgpu.a" 2>/dev/null | grep -q __asan_report; then
		san="-fsanitize=address,undefined"
	fi
	gcc $san -shared -o "$so" -Wl,--whole-archive "$CKV_BUILD/libckvgpu.a" \
		"$CKV_BUILD/libckvengine.a" "$CKV_BUILD/libckvindex.a" -Wl,--no-whole-archive \
		$libs >&2 || return 1
	echo "$so"
}

# loader_py_env SO: make `lpy` (a Python for the binding) load SO; an ASan
# build needs the sanitizer runtimes preloaded into that Python only (and
# leak checks off: Python keeps memory until exit).
loader_py_env() {
	export CKV_LIBCKVGPU=$1
	LOADER_PRELOAD=""
	if nm -D "$1" 2>/dev/null | grep -q __asan_init; then
		LOADER_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
	fi
	export LOADER_PRELOAD
}

lpy() {
	if [ -n "$LOADER_PRELOAD" ]; then
		LD_PRELOAD="$LOADER_PRELOAD" ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 "$PY" "$@"
	else
		"$PY" "$@"
	fi
}

# loader_tool NAME DIR: print the path of tools/NAME.c built against
# $CKV_BUILD's archives: $CKV_BUILD/NAME when the Makefile made it, else
# linked into DIR.
loader_tool() {
	local name=$1 dir=$2 libs san="" cuda=${CUDA_HOME:-/usr/local/cuda}
	if [ -x "$CKV_BUILD/$name" ] && ! [ "$CKV_BUILD/libckvgpu.a" -nt "$CKV_BUILD/$name" ]; then
		echo "$CKV_BUILD/$name"
		return 0
	fi
	libs="$(pkg-config --libs liburing lmdb libxxhash jansson) -lm -pthread"
	if nm "$CKV_BUILD/libckvgpu.a" 2>/dev/null | grep -q cudaLaunchKernel; then
		libs="$libs -L$cuda/lib64 -Wl,-rpath,$cuda/lib64 -lcudart -lstdc++"
	fi
	if nm "$CKV_BUILD/libckvgpu.a" 2>/dev/null | grep -q __asan_report; then
		san="-fsanitize=address,undefined"
	fi
	gcc $san -std=gnu11 -O2 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -I"$CKV_SRC/index" \
		-I"$CKV_SRC/ckvfs" -I"$CKV_SRC/gpu" $(pkg-config --cflags liburing lmdb libxxhash jansson) \
		-o "$dir/$name" "$CKV_SRC/tools/$name.c" "$CKV_BUILD/libckvgpu.a" \
		"$CKV_BUILD/libckvengine.a" "$CKV_BUILD/libckvindex.a" $libs >&2 || return 1
	echo "$dir/$name"
}
