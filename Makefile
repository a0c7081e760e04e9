# sparegrid: one entry point for developers and CI (.ci/run calls `make test`).
#
# Everything a fresh Debian 12 machine (root) needs is installed by `make deps`;
# nothing else has to be set up by hand. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# rustup installs cargo here; CI's environment may not have it on PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
LIBVIRT_URI ?= qemu:///system
# Outside the checkout on purpose: QEMU runs as libvirt-qemu and cannot read a
# clone under /root. This is also the agent's default [vm] kernel/initrd path.
IMAGE_DIR ?= /var/lib/sparegrid/images/default
# Real-VM tests boot TCG guests, and each busy guest takes a whole core. On the
# 2-core CI machine more than two test threads would starve the guests (boot
# deadlines) and the agent under test alike. Test binaries already run one
# after another, so this bounds the whole run to two tests at a time.
TEST_THREADS ?= 2
BENCH_ARGS ?=
# bench-e2e's reference side: dask.distributed from PyPI in a venv outside the
# checkout (pinned, so runs compare like with like).
BENCH_VENV ?= /var/tmp/sparegrid-bench-venv
DASK_VERSION ?= 2026.8.0
# A standard third-party tus client (tuspy from PyPI) the transfer tests
# upload with, in a venv outside the checkout (pinned).
TUS_VENV ?= /var/tmp/sparegrid-tus-venv
TUSPY_VERSION ?= 1.1.0

# Debian packages: the hypervisor stack, libvirt headers for the `virt` crate,
# the guest image's ingredients (libc6-dev: glibc's static libraries for the
# crt-static guest worker), stress-ng for load tests, systemd for
# systemd-analyze (unit test), socat to read guest channels (boot-check),
# iproute2 for the controller test's dedicated uplink (a veth pair) and the
# network-namespace test, nftables for that test's firewalled agent,
# wireguard-go + wireguard-tools (the tunnel's interop peer) and iperf3 (the
# tunnel benchmark), nginx-light (the transfer benchmark's reference server),
# python3-venv (tus-venv: a standard tus client for the transfer tests).
# qemu-utils and the cloud kernel come in separate apt calls (deps-system).
APT_PACKAGES := libvirt-daemon-system qemu-system-x86 libvirt-dev libvirt-clients \
	busybox-static cpio stress-ng pkg-config systemd socat jq curl iproute2 nftables libc6-dev \
	wireguard-go wireguard-tools iperf3 nginx-light python3-venv
KERNEL_PACKAGE := linux-image-cloud-amd64

# The guest worker, a static binary for the initramfs. Its own target dir, so
# the crt-static RUSTFLAGS do not invalidate the workspace's build cache.
GUEST_TARGET := x86_64-unknown-linux-gnu
GUEST_OUT := target/guest/$(GUEST_TARGET)/release
GUEST_BIN := $(GUEST_OUT)/sparegrid-guest
GUEST_PROBE := $(GUEST_OUT)/sparegrid-guest-probe
GUEST_SOURCES := $(shell find agent/guest/src agent/proto/src -name '*.rs') \
	agent/guest/Cargo.toml agent/proto/Cargo.toml Cargo.toml Cargo.lock

# Environment for everything that may talk to a real libvirtd and boot the image.
VM_ENV := SPAREGRID_LIBVIRTD=1 SPAREGRID_IMAGE_DIR=$(IMAGE_DIR) LIBVIRT_DEFAULT_URI=$(LIBVIRT_URI)

.PHONY: help deps deps-system deps-rust tus-venv libvirtd guest-bin image boot-check build test demo demo-agent \
	bench-agent bench-controller bench-transfer bench-tunnel bench-venv bench-e2e clean-image fmt lint

help:
	@echo "make deps         install system packages (apt, only what is missing), check cargo, cargo fetch"
	@echo "make tus-venv     python venv with tuspy==$(TUSPY_VERSION), the transfer tests' standard tus client"
	@echo "make libvirtd     start virtlogd + libvirtd unless running; wait for $(LIBVIRT_URI)"
	@echo "make guest-bin    build the static guest worker (and its probe) into $(GUEST_OUT)"
	@echo "make image        build the guest image with the worker into $(IMAGE_DIR) (workloads/build-image.sh)"
	@echo "make boot-check   boot the guest image once under libvirt (workloads/boot-check.sh)"
	@echo "make build        cargo build --workspace"
	@echo "make test         deps, libvirtd, image, boot-check, then cargo test with real-VM tests on"
	@echo "make demo         controller + 2 local agents run workloads/jobs/sample.toml in grid VMs (tests/demo.sh)"
	@echo "make demo-agent   one agent's grid VM under load on a real libvirtd (tests/demo-agent.sh)"
	@echo "make bench-agent  run the agent benchmark (release build)"
	@echo "make bench-controller  controller dispatch, memory with 1M queued, pull vs push, recovery after kill -9 (release build)"
	@echo "make bench-transfer  transfer endpoint: 1 GiB download vs nginx, tus upload, resume cost, RSS (release build)"
	@echo "make bench-tunnel    tunnel endpoint vs wireguard-go: iperf3 throughput, added RTT, CPU per GiB (root)"
	@echo "make bench-venv   python venv with dask[distributed]==$(DASK_VERSION) in $(BENCH_VENV)"
	@echo "make bench-e2e    end-to-end no-op throughput, controller + 4 agents vs dask (release, root)"
	@echo "make clean-image  remove the built guest image"
	@echo "make fmt | lint   cargo fmt / cargo clippy -D warnings"

deps: deps-system deps-rust

# apt only when something is missing: `apt-get update` once, then the packages.
# dpkg-query (not `dpkg -s`, which also succeeds for removed packages that left
# config files) tells what is really installed.
deps-system:
	@missing=""; \
	for p in $(APT_PACKAGES) qemu-utils $(KERNEL_PACKAGE); do \
	    dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: system packages present"; exit 0; fi; \
	echo "deps: installing:$$missing"; \
	if [ "$$(id -u)" -ne 0 ]; then echo "deps: need root for apt-get (missing:$$missing)" >&2; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q; \
	apt-get install -y -q $(APT_PACKAGES); \
	apt-get install -y -q qemu-utils; \
	apt-get install -y -q --no-install-recommends $(KERNEL_PACKAGE)

# No toolchain can be downloaded here: cargo must come from rustup's
# ~/.cargo/bin (on PATH above) or be on PATH already.
deps-rust:
	@command -v $(CARGO) >/dev/null || { \
	    echo "deps: no cargo on PATH (looked in $(HOME)/.cargo/bin too); install a Rust toolchain >= 1.80" >&2; exit 1; }
	@$(CARGO) --version
	$(CARGO) fetch

libvirtd: deps-system
	@if [ -d /run/systemd/system ]; then \
	    systemctl start virtlogd.service libvirtd.service; \
	else \
	    pgrep -x virtlogd >/dev/null || { echo "libvirtd: starting virtlogd"; virtlogd -d; }; \
	    pgrep -x libvirtd >/dev/null || { echo "libvirtd: starting libvirtd"; libvirtd -d; }; \
	fi; \
	for i in $$(seq 1 60); do \
	    if virsh -c $(LIBVIRT_URI) version >/dev/null 2>&1; then \
	        echo "libvirtd: $(LIBVIRT_URI) answers"; exit 0; \
	    fi; \
	    sleep 0.5; \
	done; \
	echo "libvirtd: $(LIBVIRT_URI) did not answer within 30s" >&2; \
	virsh -c $(LIBVIRT_URI) version >&2 || true; \
	exit 1

guest-bin: $(GUEST_BIN)

# cargo leaves the binary alone when nothing it depends on changed (say
# Cargo.lock gained another crate's dependency): touch it so make agrees.
$(GUEST_BIN) $(GUEST_PROBE) &: $(GUEST_SOURCES) | deps-rust
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release -p sparegrid-guest \
	    --target $(GUEST_TARGET) --target-dir target/guest
	touch $(GUEST_BIN) $(GUEST_PROBE)

# Built when the manifest is missing or older than the script, /init or the
# guest worker. The script leaves unchanged files alone, so the manifest is
# touched afterwards.
image: $(IMAGE_DIR)/manifest.json

$(IMAGE_DIR)/manifest.json: workloads/build-image.sh workloads/guest/init $(GUEST_BIN) | deps-system
	SPAREGRID_IMAGE_OUT=$(IMAGE_DIR) SPAREGRID_GUEST_BIN=$(GUEST_BIN) bash workloads/build-image.sh
	touch $@

# Boots the image and checks the worker answers an Attach (with the probe).
boot-check: libvirtd image $(GUEST_PROBE)
	LIBVIRT_URI=$(LIBVIRT_URI) PROBE=$(GUEST_PROBE) bash workloads/boot-check.sh $(IMAGE_DIR)

build: deps-rust
	$(CARGO) build --workspace

# The end-to-end tests run the agent binary, which `cargo test` alone does not
# build (no integration tests live in the agent package): build it first.
# CARGO_INCREMENTAL=0: a one-off build gains nothing from incremental caches,
# which cost gigabytes of a CI machine's small disk (see Cargo.toml's dev profile).
test: deps tus-venv libvirtd image boot-check
	CARGO_INCREMENTAL=0 $(CARGO) build --workspace
	$(VM_ENV) SPAREGRID_TUSPY=$(TUS_VENV)/bin/python RUST_BACKTRACE=1 CARGO_INCREMENTAL=0 \
	    $(CARGO) test --workspace -- --test-threads=$(TEST_THREADS)

# The grid end to end: a controller, two local agents (libvirt runtime, one
# TCG grid VM each), the sample job submitted with the CLI and run inside the
# grid VMs. Needs root, libvirtd and the guest image.
demo: deps libvirtd image build
	$(VM_ENV) bash tests/demo.sh

# The agent alone on a real libvirtd: a grid VM suspended under load, resumed,
# reclaimed.
demo-agent: deps libvirtd image build
	$(VM_ENV) bash tests/demo-agent.sh

bench-agent: deps libvirtd image
	$(CARGO) build --release -p sparegrid-agent -p sparegrid-tests
	$(VM_ENV) ./target/release/bench-agent $(BENCH_ARGS)

# Dispatch (in-process controller, fake agents), memory (the real controller
# binary as a child), pull vs push (agent library in process) and recovery
# after kill -9 (real agent processes, root); no libvirtd or guest image
# needed (docs/benchmarks.md). `BENCH_ARGS="--only pull"` picks one.
bench-controller: deps
	$(CARGO) build --release -p sparegrid-controller -p sparegrid-agent -p sparegrid-tests --bin sparegrid-controller --bin sparegrid-agent --bin bench-controller
	./target/release/bench-controller $(BENCH_ARGS)

# The transfer endpoint against nginx serving the same file (docs/transfer.md).
bench-transfer: deps
	$(CARGO) build --release -p sparegrid-agent -p sparegrid-tests --bin bench-transfer
	./target/release/bench-transfer $(BENCH_ARGS)

# The WireGuard tunnel endpoint against wireguard-go, iperf3 through both,
# in network namespaces (root; docs/tunnel.md).
bench-tunnel: deps
	$(CARGO) build --release -p sparegrid-agent -p sparegrid-tests --bin bench-tunnel --bin sparegrid-tunnel
	./target/release/bench-tunnel $(BENCH_ARGS)

# tuspy from PyPI only when the venv lacks the pinned version.
tus-venv: deps-system
	@if [ -x $(TUS_VENV)/bin/python ] && $(TUS_VENV)/bin/python -c \
	    'import sys, importlib.metadata as m; sys.exit(m.version("tuspy") != "$(TUSPY_VERSION)")' 2>/dev/null; then \
	    echo "tus-venv: $(TUS_VENV) has tuspy $(TUSPY_VERSION)"; exit 0; \
	fi; \
	python3 -m venv $(TUS_VENV); \
	$(TUS_VENV)/bin/pip install -q --disable-pip-version-check 'tuspy==$(TUSPY_VERSION)'

# python3-venv from apt only when missing; dask from PyPI only when the venv
# cannot import the pinned version.
bench-venv:
	@if [ -x $(BENCH_VENV)/bin/python ] && $(BENCH_VENV)/bin/python -c \
	    'import sys, dask, distributed; sys.exit(dask.__version__ != "$(DASK_VERSION)")' 2>/dev/null; then \
	    echo "bench-venv: $(BENCH_VENV) has dask $(DASK_VERSION)"; exit 0; \
	fi; \
	if ! dpkg-query -W -f='$${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed'; then \
	    echo "bench-venv: installing python3-venv"; \
	    if [ "$$(id -u)" -ne 0 ]; then echo "bench-venv: need root for apt-get (python3-venv)" >&2; exit 1; fi; \
	    export DEBIAN_FRONTEND=noninteractive; apt-get update -q; apt-get install -y -q python3-venv; \
	fi; \
	python3 -m venv $(BENCH_VENV); \
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check 'dask[distributed]==$(DASK_VERSION)'

# Root: the agents create cgroup partitions. No libvirt (process runtime).
bench-e2e: deps-rust bench-venv
	$(CARGO) build --release -p sparegrid-agent -p sparegrid-controller -p sparegrid-tests
	./target/release/bench-e2e --python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

clean-image:
	rm -rf $(IMAGE_DIR)

fmt:
	$(CARGO) fmt --all

lint: deps-rust
	$(CARGO) clippy --workspace -- -D warnings
