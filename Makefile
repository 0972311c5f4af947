# ferry — every entry point a developer or CI needs.
.DEFAULT_GOAL := help
CARGO ?= cargo
SHELL := /bin/bash

.PHONY: help build demo test lint fmt bench compare certs ci clean deps fuzz soak

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

deps: ## install what tests need on a fresh machine (openssl CLI, Envoy 1.40 in .deps/envoy)
	@command -v openssl >/dev/null 2>&1 || { \
	  echo "installing openssl (interop tests drive ferry from OpenSSL)"; \
	  apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
	@bash tests/envoy/install.sh >/dev/null

build: ## release build: target/release/ferry and target/release/ferry-envoy (xDS mode)
	$(CARGO) build --release

demo: ## run the local mesh demo (dev certs, an app, three ferries, allowed and denied calls)
	$(CARGO) run --quiet -- demo

# The soft descriptor limit is raised to the hard one so the hostile-input
# test can hold its 10,000 half-open connections.
test: deps ## unit, integration (real sockets, real TLS, OpenSSL interop) and doc tests
	ulimit -n $$(ulimit -Hn); $(CARGO) test --all-targets
	$(CARGO) test --doc

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt

bench: ## criterion benchmarks: splice through TLS, mTLS handshake, balancer
	$(CARGO) bench

compare: ## ferry vs haproxy, nginx, stunnel and Envoy, side by side, with ratios to Envoy and a chart (installs them; ARGS=--quick for a smoke run)
	bash bench/compare.sh $(ARGS)

certs: ## dev CA and leaves for web, api and billing in certs/
	$(CARGO) run --quiet -- certs -dir certs web api billing

# Fuzzing: cargo-fuzz normally wants a nightly compiler for its sanitizers.
# ferry forbids unsafe code, so the fuzzers look for panics, aborts and
# broken invariants rather than memory errors: no sanitizer (-s none), and
# RUSTC_BOOTSTRAP lets the stable compiler accept cargo-fuzz's flags.
# Each target starts from the curated corpus, copied so runs never add to it.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := spiffe_id flags agent_json peer_cert
fuzz: ## run each fuzz target for FUZZ_SECONDS (default 60)
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	@for t in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d); cp fuzz/corpus/$$t/* $$work/; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none $$t $$work -- -max_total_time=$(FUZZ_SECONDS) 2>&1 | grep -E '^(Done|INFO: Seed)|panicked|ERROR|Failing input|Base64' ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	  rm -rf $$work; \
	done

soak: ## 200k short and 9k held connections through two ferries, with flips and rotations; checks leaks
	ulimit -n $$(ulimit -Hn); $(CARGO) test --release --test it soak -- --ignored --nocapture

ci: lint test ## what CI runs

clean: ## remove build output
	$(CARGO) clean
