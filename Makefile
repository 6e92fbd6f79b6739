# Everything runs inside .venv, which this Makefile creates; nothing relies on what is installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint bench peers clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tactician demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# The console's browser tests drive Debian's chromium (Playwright with executable_path): as root,
# install it when it is missing; otherwise those tests skip with the reason (and fail in CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the browser tests will skip"

test: install lint browser
	$(BIN)/pytest

bench: install
	$(BIN)/tactician bench throughput --tasks 20000 --workers 2 --db sqlite:///$(CURDIR)/.bench/bench.db --json

peers: install
	$(BIN)/python benchmarks/peers/run.py

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache
