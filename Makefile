# Developer shortcuts. The README's main command is `make demo`.

CARGO ?= cargo
# Extra arguments for `faultline demo`, e.g. make demo DEMO_ARGS="--dir /tmp/fl --keep".
DEMO_ARGS ?=

.PHONY: demo build test lint

## demo: build the release binaries, then run a local three-host game-day (needs Docker).
demo:
	$(CARGO) build --release --workspace --bins
	./target/release/faultline demo $(DEMO_ARGS)

## build: every workspace binary (debug).
build:
	$(CARGO) build --workspace --bins

## test: the end-to-end tests run target/debug/faultline*, which `cargo test` does not build.
test: build
	$(CARGO) test --workspace

## lint: formatting and clippy, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
