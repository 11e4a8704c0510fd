# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
#
# What ships is what is tested: `make test` builds the sdist and wheel, installs the wheel
# (not editable) into a fresh virtual environment and runs the suite from a copy of the
# tests that holds no source package, so every import resolves to the installed wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIST := build/dist
TESTENV := build/test-venv
TESTTREE := build/test-tree
INTEROP := build/interop
# Most of the suite's time is spent waiting on real processes, sockets and deadlines, not
# computing, so three pytest workers (a file each at a time: files share fixtures) finish it
# in well under half the serial time on 2 cores. Every test is isolated (its own state dir,
# store and PostgreSQL schema), which is what makes this safe.
TEST_WORKERS ?= 3

.PHONY: demo test lint dist wheel-test interop bench docs clean chromium

# .venv is the developer's: the tools and the project, editable.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrator demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict events orchestrator

dist: $(STAMP)
	rm -rf $(DIST)
	$(BIN)/python -m build --quiet --sdist --wheel --outdir $(DIST) . >/dev/null

wheel-test: dist
	rm -rf $(TESTENV) $(TESTTREE)
	$(PYTHON) -m venv $(TESTENV)
	$(TESTENV)/bin/python -m pip install --quiet --upgrade pip
	$(TESTENV)/bin/python -m pip install --quiet "$$(ls $(DIST)/*.whl)[test]"
	mkdir -p $(TESTTREE)
	cp -r tests docs ADR bench README.md pyproject.toml $(TESTTREE)/
	cd $(TESTTREE) && ORCHESTRATOR_TEST_INSTALLED=1 HYPOTHESIS_PROFILE=ci \
		PATH="$(CURDIR)/$(TESTENV)/bin:$$PATH" $(CURDIR)/$(TESTENV)/bin/pytest -q -p no:cacheprovider \
		-n $(TEST_WORKERS) --dist loadfile

test: lint chromium wheel-test

# The inspector's browser test drives Debian's chromium; without it (and no apt) it skips.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 || \
		echo "chromium not installed (no usable apt-get): the browser tests will skip"

# The project against real third-party peers, pinned in interop/peers.toml. Each peer is
# installed from its registry into its own environment under $(INTEROP)/peers (kept while its
# pin is unchanged), so its dependency pins never meet ours; a peer that cannot be installed
# skips its tests with the reason. The tests run like wheel-test's: the installed wheel, a
# tree with no source package.
interop: dist
	rm -rf $(INTEROP)/venv $(INTEROP)/tree
	$(PYTHON) -m venv $(INTEROP)/venv
	$(INTEROP)/venv/bin/python -m pip install --quiet --upgrade pip
	$(INTEROP)/venv/bin/python -m pip install --quiet "$$(ls $(DIST)/*.whl)[test]"
	$(BIN)/python -m interop install --into $(INTEROP)/peers --python $(PYTHON)
	mkdir -p $(INTEROP)/tree
	cp -r interop $(INTEROP)/tree/
	cd $(INTEROP)/tree && INTEROP_PEERS="$(CURDIR)/$(INTEROP)/peers/status.json" \
		PATH="$(CURDIR)/$(INTEROP)/venv/bin:$$PATH" $(CURDIR)/$(INTEROP)/venv/bin/pytest \
		-q -p no:cacheprovider -ra -o timeout=300 interop

docs: $(STAMP)
	$(BIN)/python docs/generate.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
