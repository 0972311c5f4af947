# ferry — every entry point a developer or CI needs.
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help build demo test lint fmt bench certs ci clean deps

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

deps: ## install what tests need on a fresh machine (openssl CLI for interop tests)
	@command -v openssl >/dev/null 2>&1 || { \
	  echo "installing openssl (interop tests drive ferry from OpenSSL)"; \
	  apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }

build: ## release build: target/release/ferry
	$(CARGO) build --release

demo: ## run the local mesh demo (dev certs, an app, three ferries, allowed and denied calls)
	$(CARGO) run --quiet -- demo

test: deps ## unit, integration (real sockets, real TLS, OpenSSL interop) and doc tests
	$(CARGO) test --all-targets
	$(CARGO) test --doc

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt

bench: ## criterion benchmarks: splice through TLS, mTLS handshake, balancer
	$(CARGO) bench

certs: ## dev CA and leaves for web, api and billing in certs/
	$(CARGO) run --quiet -- certs -dir certs web api billing

ci: lint test ## what CI runs

clean: ## remove build output
	$(CARGO) clean
