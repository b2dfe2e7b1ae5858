# One target per intention.  `make test` and `make demo` install everything
# they need first (scripts/install-deps.sh is idempotent and cheap when done).

ARCH        := $(shell uname -m)
CLANG       ?= $(shell command -v clang-19 || command -v clang)
BPF_CFLAGS  := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) \
               -I/usr/include/$(ARCH)-linux-gnu -Ibpf
BPF_SRC     := $(wildcard bpf/*.bpf.c)
# One source, several objects: the guard for each hook and link layer, the
# marker for devices without an Ethernet header (bpf/hook.h, parse_l2() in
# bpf/parsing.h).  The loader picks one when it attaches (netoken/guard/,
# netoken/marker.py).
BPF_VARIANTS := guard_tc guard_tc_l3 marker_l3
BPF_OBJ     := $(patsubst bpf/%.bpf.c,netoken/bpf/%.bpf.o,$(BPF_SRC)) \
               $(patsubst %,netoken/bpf/%.bpf.o,$(BPF_VARIANTS))
BPF_HDR     := $(wildcard bpf/*.h)
VENV        := .venv
PYTEST_ARGS ?=
KERNELS_ARGS ?=

.PHONY: all build bpf manual deps test test-unit test-kernels demo bench lint clean

all: build

deps:
	@scripts/install-deps.sh

build: deps bpf manual

bpf: $(BPF_OBJ)

# The man page and the bash completion, read off the CLI's parser
# (netoken/manual.py); docs/operations.md says where they go.
MANUAL := build/netoken.1 build/netoken.bash
manual: $(MANUAL)

build/netoken.1: $(wildcard netoken/*.py netoken/*/*.py)
	@mkdir -p build
	$(VENV)/bin/python -m netoken.manual --man > $@.tmp && mv $@.tmp $@

build/netoken.bash: $(wildcard netoken/*.py netoken/*/*.py)
	@mkdir -p build
	$(VENV)/bin/python -m netoken.manual --bash > $@.tmp && mv $@.tmp $@

define compile_bpf
	@test -n "$(CLANG)" || { echo "netoken: clang not found; install it with: apt-get install clang-19" >&2; exit 1; }
	@test -f /usr/include/bpf/bpf_helpers.h || { echo "netoken: libbpf headers not found (bpf/bpf_helpers.h); install them with: apt-get install libbpf-dev" >&2; exit 1; }
	@test -f /usr/include/$(ARCH)-linux-gnu/asm/types.h || { echo "netoken: asm/types.h not found; install it with: apt-get install linux-libc-dev" >&2; exit 1; }
	@mkdir -p netoken/bpf
	$(CLANG) $(BPF_CFLAGS) $(VARIANT_FLAGS) -c $< -o $@
endef

netoken/bpf/%.bpf.o: bpf/%.bpf.c $(BPF_HDR)
	$(compile_bpf)

netoken/bpf/guard_tc.bpf.o: VARIANT_FLAGS := -DNT_HOOK_TC
netoken/bpf/guard_tc_l3.bpf.o: VARIANT_FLAGS := -DNT_HOOK_TC -DNT_L3
netoken/bpf/marker_l3.bpf.o: VARIANT_FLAGS := -DNT_L3

netoken/bpf/guard_%.bpf.o: bpf/guard.bpf.c $(BPF_HDR)
	$(compile_bpf)

netoken/bpf/marker_%.bpf.o: bpf/marker.bpf.c $(BPF_HDR)
	$(compile_bpf)

test: build
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# tests/unit as nobody, without privileges and without write access to the
# checkout: proof that they need neither root nor the kernel.  The venv's
# interpreter lives under root's home, so the system python3 (the same
# minor version) runs them on the venv's packages.  As any user elsewhere:
# python -m pytest tests/unit.
UNPRIVILEGED := setpriv --reuid=65534 --regid=65534 --clear-groups
SITE_PACKAGES = $(wildcard $(CURDIR)/$(VENV)/lib/python3*/site-packages)
test-unit: build
	$(UNPRIVILEGED) env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
		PYTHONPATH=$(CURDIR):$(SITE_PACKAGES) sh -c 'HYPOTHESIS_STORAGE_DIRECTORY=$$(mktemp -d) \
		exec python3 -m pytest tests/unit -p no:cacheprovider -q $(PYTEST_ARGS)'

# The kernel-facing suites on Debian's 6.1 and 6.12 under QEMU and on the
# running kernel; table and JSON in build/test-kernels/ (scripts/test-kernels).
test-kernels: build
	scripts/test-kernels $(KERNELS_ARGS)

demo: build
	$(VENV)/bin/netoken demo

# The table goes to the terminal and to bench/latest.txt, the figures as JSON
# to bench/latest.json (both untracked; bench/README.md holds the published run).
bench: build
	$(VENV)/bin/netoken bench -o bench/latest.json > bench/latest.txt; rc=$$?; cat bench/latest.txt; exit $$rc

# ruff for likely bugs and the one format, mypy for types (settings in
# pyproject.toml).  `ruff format netoken tests scripts/test-kernels` fixes
# what the format check finds.
LINTED := netoken tests scripts/test-kernels
lint: deps
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

clean:
	rm -rf netoken/bpf/*.o build *.egg-info
