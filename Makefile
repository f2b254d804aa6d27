# dps-agent: developer entry points. A newcomer on a fresh Debian 12 machine runs
#   make demo   # installs what is missing, builds, provisions against the simulator
#   make test   # the same set-up, then fmt, clippy and every test
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Debian packages the build, the tests and the demo need (one list, used by `deps`).
DEB_PACKAGES := build-essential pkg-config libtss2-dev openssl ca-certificates \
  swtpm swtpm-tools tpm2-tools tpm2-openssl softhsm2 opensc opensc-pkcs11 gnutls-bin \
  mosquitto mosquitto-clients dbus-daemon libglib2.0-bin systemd lintian python3-venv iproute2 \
  adduser dpkg-dev

.PHONY: help deps toolchain build demo test unit e2e lint clean

help:
	@echo "make demo   - install missing packages, build, provision against the DPS simulator, show the status"
	@echo "make test   - the same set-up, then cargo fmt --check, clippy -D warnings and every test"
	@echo "make clean  - remove build output and test scratch directories"
	@echo "make bench  - release build, then provisioning time vs Microsoft's Python SDK, overhead, idle RSS/CPU, size, D-Bus reads"
	@echo "make deb    - build the amd64 .deb (release) into target/debian/"
	@echo "make deb-arm64 - cross-build the arm64 .deb (installs the cross toolchain and qemu-user as root)"
	@echo "make package-test - lintian, systemd-analyze, dpkg -i/-r/-P and the arm64 binary under qemu (make test runs it)"
	@echo "make soak   - SIGKILL the daemon at SOAK_ITERATIONS (500) random moments during renewals, keys in swtpm"
	@echo "make fuzz   - run every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (60) each"
	@echo "make system-test - the .deb in a booted Debian 12 container (systemd-nspawn, as root; debootstrap cached in target/system-test/)"

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "deps: all Debian packages present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "deps: installing:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else \
	  echo "deps: missing packages; run as root:"; \
	  echo "  apt-get install -y --no-install-recommends" $$missing; exit 1; \
	fi

toolchain:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

build: deps toolchain
	$(CARGO) build --workspace --bins --locked

demo: build
	scripts/demo.sh

lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: build lint venv
	$(CARGO) test --workspace --locked
	$(MAKE) --no-print-directory package-test

clean:
	$(CARGO) clean
	rm -rf "$${TMPDIR:-/tmp}/dps-agent-e2e"

# `make soak`: the crash test of the renewal suite, longer and with the keys in swtpm.
# Every kill is followed by a restart that must come back with a working identity
# (see tests/e2e/tests/renewal.rs, survives_sigkill_at_random_moments_during_renewals).
SOAK_ITERATIONS ?= 500
.PHONY: soak
soak: build
	DPS_AGENT_CRASH_BACKEND=tpm DPS_AGENT_CRASH_ITERATIONS=$(SOAK_ITERATIONS) \
	  $(CARGO) test -p dps-agent-e2e --locked --test renewal survives_sigkill -- --nocapture

# --- Fuzzing (not part of `make test`) ---------------------------------------
# `make fuzz`: each cargo-fuzz target in fuzz/ for FUZZ_SECONDS, from its committed
# corpus fuzz/corpus/<target>/ (only read: new inputs go to fuzz/target/corpus/,
# crashes to fuzz/artifacts/). cargo-fuzz needs nightly features: the nightly
# toolchain when rustup has one, else the default toolchain with RUSTC_BOOTSTRAP=1.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs)))
.PHONY: fuzz
fuzz:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	@set -e; \
	if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then fuzz="$(CARGO) +nightly fuzz"; \
	else fuzz="env RUSTC_BOOTSTRAP=1 $(CARGO) fuzz"; fi; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS)s ($$fuzz)"; \
	  $$fuzz run --target-dir fuzz/target $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1; \
	done

# --- Proof: Microsoft's Python device SDK and jsonschema (conformance and schema suites,
# benchmarks), in a venv under .venv/ from PyPI; and the benchmarks (figures, never pass/fail).
VENV := .venv
PY_PACKAGES := azure-iot-device==2.14.0 jsonschema==4.26.0

.PHONY: venv bench

venv: deps
	@if $(VENV)/bin/python -c 'import azure.iot.device, jsonschema' 2>/dev/null \
	  && $(VENV)/bin/pip freeze 2>/dev/null | grep -qx 'azure-iot-device==2.14.0'; then \
	  echo "venv: $(VENV) has $(PY_PACKAGES)"; \
	else \
	  python3 -m venv $(VENV) && $(VENV)/bin/pip install -q --disable-pip-version-check $(PY_PACKAGES) \
	  || { echo "venv: pip could not install $(PY_PACKAGES) from PyPI into $(VENV) (is PyPI reachable?);" \
	       "the conformance and schema suites and make bench need them"; exit 1; }; \
	fi

# Release binaries, then every benchmark of dps-bench (prints Markdown tables).
bench: deps toolchain venv
	$(CARGO) build --release --locked --workspace --bins
	DPS_AGENT_BIN=$(CURDIR)/target/release/dps-agent DPS_SIM_BIN=$(CURDIR)/target/release/dps-sim \
	  target/release/dps-bench all

# --- Packaging: .deb for amd64 and arm64 (cargo-deb), and their tests -------
# `make deb` builds target/debian/dps-agent_<version>-1_amd64.deb; `make
# deb-arm64` cross-builds the arm64 one (Debian multiarch: libtss2-dev:arm64,
# gcc-aarch64-linux-gnu; PKG_CONFIG_LIBDIR, never PKG_CONFIG_SYSROOT_DIR).
# Man pages and completions are generated by the binary itself
# (`dps-agent generate-docs`) into target/<triple>/release/gen, never committed;
# gzipped here, as cargo-deb compresses only man pages that are not build products.
CARGO_DEB_VERSION := 3.8.0
ARM64_TARGET := aarch64-unknown-linux-gnu
ARM64_DEB_PACKAGES := gcc-aarch64-linux-gnu libc6-dev-arm64-cross libtss2-dev:arm64 qemu-user
ARM64_ENV := PKG_CONFIG_ALLOW_CROSS=1 \
  PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
  AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

.PHONY: cargo-deb deb arm64-deps deb-arm64 package-test

cargo-deb: toolchain
	@$(CARGO) deb --version 2>/dev/null | grep -qx 'cargo-deb $(CARGO_DEB_VERSION)' \
	  || $(CARGO) install --locked cargo-deb@$(CARGO_DEB_VERSION)

deb: deps cargo-deb
	$(CARGO) build --release --locked -p dps-agent --bin dps-agent
	rm -rf target/release/gen
	target/release/dps-agent generate-docs --out target/release/gen >/dev/null
	gzip -9n target/release/gen/man/*.8
	$(CARGO) deb -p dps-agent --no-build --locked --output target/debian/
	@ls -l target/debian/dps-agent_*_amd64.deb

# The arm64 toolchain: rustup's target, the cross gcc, arm64 libtss2 through
# multiarch, and qemu-user to run the result (never `qemu-aarch64 -L
# /usr/aarch64-linux-gnu`: a mismatched ld.so/libc pair hangs at the first thread).
arm64-deps: deps
	@rustup target list --installed 2>/dev/null | grep -qx $(ARM64_TARGET) || rustup target add $(ARM64_TARGET)
	@missing=$$(for p in $(ARM64_DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "arm64-deps: all present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "arm64-deps: installing:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else \
	  echo "arm64-deps: missing packages; run as root:"; \
	  echo "  dpkg --add-architecture arm64 && apt-get update && apt-get install -y --no-install-recommends" $$missing; exit 1; \
	fi

deb-arm64: arm64-deps cargo-deb
	env $(ARM64_ENV) $(CARGO) build --release --locked -p dps-agent --bin dps-agent --target $(ARM64_TARGET)
	rm -rf target/$(ARM64_TARGET)/release/gen
	qemu-aarch64 target/$(ARM64_TARGET)/release/dps-agent generate-docs --out target/$(ARM64_TARGET)/release/gen >/dev/null
	gzip -9n target/$(ARM64_TARGET)/release/gen/man/*.8
	$(CARGO) deb -p dps-agent --no-build --locked --target $(ARM64_TARGET) --output target/debian/
	@ls -l target/debian/dps-agent_*_arm64.deb

# Installs, checks and purges the amd64 package on this machine (as root), and
# runs the arm64 binary under qemu against dps-sim. Runs after the other suites
# (they create the same users) and leaves the machine as it found it.
package-test: build deb deb-arm64
	$(CARGO) test --locked -p dps-agent-e2e --test package -- --ignored --test-threads=1 --nocapture

# --- Booted-system test (not part of `make test`) ----------------------------
# `make system-test`: the .deb in a Debian 12 guest booted with systemd-nspawn
# --boot --private-network (real systemd, system bus, journald), dps-sim inside
# on loopback: install, start limit, provisioning, D-Bus policy, restart and
# reboot, watchdog, upgrade, DPS down, purge (tests/system/run.sh, as root).
# The debootstrap root file system is made once and cached in target/system-test/.
.PHONY: system-test
system-test: build deb
	tests/system/run.sh
