# Developer shortcuts. The README's main command is `make demo`.

CARGO ?= cargo
# Extra arguments for `faultline lab demo`, e.g. make demo DEMO_ARGS="--dir /tmp/fl-lab".
DEMO_ARGS ?=

.PHONY: demo local-demo build test lint

## demo: build every release binary (the order API included), then `faultline lab demo`: the
## container lab with its demo stack, the multi-service cascade against it, the findings and
## an HTML report (needs Docker Engine and the Debian postgresql, redis-server and nginx
## packages). The lab stays up afterwards: `./target/release/faultline lab down`.
demo:
	$(CARGO) build --release --workspace --bins
	./target/release/faultline lab demo $(DEMO_ARGS)

## local-demo: the quicker `faultline demo`: agents as local processes, throwaway containers.
local-demo:
	$(CARGO) build --release --workspace --bins
	./target/release/faultline demo

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
