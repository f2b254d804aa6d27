# dps-agent: developer entry points. A newcomer on a fresh Debian 12 machine runs
#   make demo   # installs what is missing, builds, provisions against the simulator
#   make test   # the same set-up, then fmt, clippy and every test
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Debian packages the build, the tests and the demo need (one list, used by `deps`).
DEB_PACKAGES := build-essential pkg-config libtss2-dev openssl ca-certificates \
  swtpm swtpm-tools tpm2-tools tpm2-openssl softhsm2 opensc opensc-pkcs11 gnutls-bin \
  mosquitto mosquitto-clients dbus-daemon libglib2.0-bin systemd lintian python3-venv

.PHONY: help deps toolchain build demo test unit e2e lint clean

help:
	@echo "make demo   - install missing packages, build, provision against the DPS simulator, show the status"
	@echo "make test   - the same set-up, then cargo fmt --check, clippy -D warnings and every test"
	@echo "make clean  - remove build output and test scratch directories"

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

test: build lint
	$(CARGO) test --workspace --locked

clean:
	$(CARGO) clean
