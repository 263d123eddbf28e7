# ckvfs — top-level build.
#
#   make            build everything into build/ (CUDA parts when nvcc exists)
#   make check      install missing packages, build, run every test (plain and ASan/UBSan)
#   make demo       install missing packages, build, run the demo on ./demo/
#   make asan       unit + CLI tests under ASan/UBSan (build-asan/)
#   make deps       install the Debian packages that are missing (as root)
#   make install PREFIX=/usr/local
#   make clean
#
# V=1 for verbose, WERROR=1 (CI) adds -Werror.

PREFIX ?= /usr/local
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
PKGS_PC := fuse3 liburing lmdb libxxhash jansson

CC ?= gcc
O ?= build
SAN ?=
WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-declarations \
	-Wwrite-strings -Wundef -Wformat-security
ifeq ($(WERROR),1)
WARN += -Werror
endif
ifeq ($(CI),true)
WARN += -Werror
endif

PC_CFLAGS := $(shell pkg-config --cflags $(PKGS_PC) 2>/dev/null)
PC_LIBS := $(shell pkg-config --libs $(PKGS_PC) 2>/dev/null)

CFLAGS ?= -O2 -g
override CFLAGS += -std=gnu11 $(WARN) -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -fPIC -pthread \
	-Iindex -Ickvfs -Igpu $(PC_CFLAGS) -MMD -MP
override LDLIBS += $(PC_LIBS) -lm -pthread
ifneq ($(SAN),)
override CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
override LDFLAGS += -fsanitize=address,undefined
endif

ifeq ($(V),1)
Q :=
else
Q := @
endif

HAVE_NVCC := $(shell test -x $(NVCC) && echo 1)

INDEX_SRC := $(wildcard index/*.c)
ENGINE_SRC := $(filter-out ckvfs/main.c ckvfs/fs.c,$(wildcard ckvfs/*.c))
FS_SRC := ckvfs/fs.c ckvfs/main.c
GPU_SRC := $(wildcard gpu/*.c)
UNIT_SRC := $(wildcard tests/unit/*.c)

INDEX_OBJ := $(INDEX_SRC:%.c=$(O)/obj/%.o)
ENGINE_OBJ := $(ENGINE_SRC:%.c=$(O)/obj/%.o)
GPU_OBJ := $(GPU_SRC:%.c=$(O)/obj/%.o)

LIBINDEX := $(O)/libckvindex.a
LIBENGINE := $(O)/libckvengine.a
LIBGPU := $(O)/libckvgpu.a

BINS := $(O)/ckv
ifneq ($(wildcard ckvfs/main.c),)
BINS += $(O)/ckvfs
endif
# Tools on libckvgpu (present once their sources are)
TOOL_BINS := $(patsubst tools/%.c,$(O)/%,$(wildcard tools/bench-reprefill.c tools/bench-loader.c tools/ckv-reprefill.c))
BINS += $(TOOL_BINS)
ifneq ($(GPU_SRC),)
BINS += $(O)/libckvgpu.so
endif
UNIT_BINS := $(UNIT_SRC:tests/unit/%.c=$(O)/tests/%)

.PHONY: all check demo asan deps install clean unit bats bench
all: $(BINS) $(UNIT_BINS)

$(O)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS) -c -o $@ $<

$(LIBINDEX): $(INDEX_OBJ)
	@mkdir -p $(dir $@)
	$(Q)rm -f $@ && ar rcs $@ $^
$(LIBENGINE): $(ENGINE_OBJ)
	@mkdir -p $(dir $@)
	$(Q)rm -f $@ && ar rcs $@ $^ $(if $(ENGINE_OBJ),,)
$(LIBGPU): $(GPU_OBJ)
	@mkdir -p $(dir $@)
	$(Q)rm -f $@ && ar rcs $@ $^

$(O)/ckv: $(O)/obj/tools/ckv.o $(LIBENGINE) $(LIBINDEX)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(O)/ckvfs: $(FS_SRC:%.c=$(O)/obj/%.o) $(LIBENGINE) $(LIBINDEX)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(O)/bench-reprefill: $(O)/obj/tools/bench-reprefill.o $(O)/obj/tools/trace.o $(LIBGPU) $(LIBENGINE) $(LIBINDEX)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CUDA_LDLIBS)

$(O)/bench-loader $(O)/ckv-reprefill: $(O)/%: $(O)/obj/tools/%.o $(LIBGPU) $(LIBENGINE) $(LIBINDEX)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CUDA_LDLIBS)

# The loader as a shared library, for the Python binding (gpu/python/ckv).
$(O)/libckvgpu.so: $(LIBGPU) $(LIBENGINE) $(LIBINDEX)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -shared -o $@ -Wl,--whole-archive $(LIBGPU) $(LIBENGINE) $(LIBINDEX) \
		-Wl,--no-whole-archive $(LDLIBS) $(CUDA_LDLIBS)

$(O)/tests/%: $(O)/obj/tests/unit/%.o $(LIBGPU) $(LIBENGINE) $(LIBINDEX)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# ---- CUDA (only when $(NVCC) exists) ---------------------------------------
# gpu/cuda/*.cu join libckvgpu; gpu/*.c then see CKV_HAVE_CUDA (without it,
# gpu/backend_host.c stubs out the CUDA entry points). Anything that links
# libckvgpu links $(CUDA_LDLIBS) too; unit tests get it below. tests/gpu/*.c
# run with the unit tests and exit 77 where no GPU answers. Without nvcc
# this section adds nothing.
CUDA_LDLIBS :=
ifeq ($(HAVE_NVCC),1)
CUDA_SRC := $(wildcard gpu/cuda/*.cu)
CUDA_OBJ := $(CUDA_SRC:%.cu=$(O)/obj/%.o)
CUDA_TEST_BINS := $(patsubst tests/gpu/%.c,$(O)/tests/gpu/%,$(wildcard tests/gpu/*.c))
CUDA_BINS := $(O)/bench-gather
CUDA_LDLIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lstdc++
NVCCFLAGS := -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 \
	-gencode arch=compute_80,code=sm_80 -Xcompiler -fPIC,-Wall -Igpu -Igpu/cuda -Iindex \
	-Ickvfs -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -DCKV_HAVE_CUDA
ifneq ($(SAN),)
# ASan on the host side of .cu files where nvcc's host compiler takes it; a
# process that then initialises CUDA needs ASAN_OPTIONS=protect_shadow_gap=0
# (tests/gpu and bench-gather set it through __asan_default_options).
NVCC_ASAN := $(shell d=$$(mktemp -d) && echo 'int ckv_probe;' > $$d/p.cu && \
	$(NVCC) -Xcompiler -fsanitize=address -c -o $$d/p.o $$d/p.cu >/dev/null 2>&1 && \
	echo 1; rm -rf $$d)
ifeq ($(NVCC_ASAN),1)
NVCCFLAGS += -Xcompiler -fsanitize=address,-fno-omit-frame-pointer
endif
endif

$(O)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  NVCC    $<")
	$(Q)$(NVCC) $(NVCCFLAGS) -MMD -MP -MF $(@:.o=.d) -c -o $@ $<

$(LIBGPU): $(CUDA_OBJ)
$(GPU_OBJ): override CFLAGS += -DCKV_HAVE_CUDA
CUDA_CFLAGS := -DCKV_HAVE_CUDA -isystem $(CUDA_HOME)/include -Igpu/cuda
$(O)/obj/tests/gpu/%.o $(O)/obj/tools/bench-loader.o: override CFLAGS += $(CUDA_CFLAGS)
$(O)/tests/%: override LDLIBS += $(CUDA_LDLIBS)

$(O)/tests/gpu/%: $(O)/obj/tests/gpu/%.o $(LIBGPU) $(LIBENGINE) $(LIBINDEX)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(O)/bench-gather: $(O)/obj/tools/bench-gather.o $(LIBGPU)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CUDA_LDLIBS)

.SECONDARY: $(CUDA_TEST_BINS:$(O)/tests/gpu/%=$(O)/obj/tests/gpu/%.o)
all: $(CUDA_BINS) $(CUDA_TEST_BINS)
unit: $(CUDA_TEST_BINS)
UNIT_BINS += $(CUDA_TEST_BINS)
endif
# ---- end of CUDA -----------------------------------------------------------

# ---- tests ----------------------------------------------------------------
# Unit tests: exit 0 pass, 1 fail, 77 skip. bats: tests/bats/*.bats.
unit: $(UNIT_BINS)
	$(Q)CKV_BUILD=$(abspath $(O)) tests/run-unit $(UNIT_BINS)

bats: $(BINS)
	$(Q)CKV_BUILD=$(abspath $(O)) bats tests/bats

asan:
	$(Q)$(MAKE) --no-print-directory O=build-asan SAN=1 CFLAGS="-O1 -g" all
	$(Q)$(MAKE) --no-print-directory O=build-asan SAN=1 CFLAGS="-O1 -g" unit bats

check: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(MAKE) --no-print-directory unit bats
	$(Q)$(MAKE) --no-print-directory asan
	@echo "check: all test suites passed (plain and ASan/UBSan)"

demo: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)CKV_BUILD=$(abspath $(O)) tools/demo.sh

bench: all
	$(Q)CKV_BUILD=$(abspath $(O)) tools/bench-store.sh

DEB_PKGS := build-essential pkg-config libfuse3-dev fuse3 liburing-dev liblmdb-dev lmdb-utils \
	libxxhash-dev libjansson-dev bats rsync attr python3 python3-xxhash python3-numpy python3-torch tree bc
deps:
	$(Q)tools/install-deps.sh $(DEB_PKGS)

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/include/ckv \
		$(DESTDIR)$(PREFIX)/lib
	install -m 755 $(filter-out %.so,$(BINS)) $(DESTDIR)$(PREFIX)/bin/
	install -m 755 mount.ckvfs $(DESTDIR)$(PREFIX)/sbin/mount.ckvfs
	ln -sf mount.ckvfs $(DESTDIR)$(PREFIX)/sbin/mount.fuse.ckvfs
	install -m 644 index/*.h ckvfs/ckv_engine.h gpu/ckvgpu.h $(DESTDIR)$(PREFIX)/include/ckv/
	install -m 644 $(LIBINDEX) $(LIBENGINE) $(LIBGPU) $(DESTDIR)$(PREFIX)/lib/
	$(if $(GPU_SRC),install -m 755 $(O)/libckvgpu.so $(DESTDIR)$(PREFIX)/lib/)

clean:
	rm -rf build build-asan demo

-include $(shell find $(O) -name '*.d' 2>/dev/null)
