# The two commands of the README:  `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and fetch the default model on first use.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup model browser demo test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "edgellm needs Python 3.11, found " + sys.version'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,plot,flower]'
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/edgellm models pull

demo: model
	$(BIN)/edgellm demo

# The chat page's tests (tests/test_serve_page.py) drive headless Chromium: Debian's package, installed when missing
# (root, or sudo). Where it cannot be installed, make goes on and those tests are skipped, saying why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "make: could not install chromium; the page tests will be skipped"

test: model browser
	$(BIN)/pytest -q

# The quick tier: no real model, no node processes, nothing marked slow (a couple of minutes).
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not multiprocess and not real_model"

bench: model
	$(BIN)/python bench/decode.py

# The one list of lint checks (.ci/run calls this target), with the linters pinned in constraints.txt.
lint: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,plot,flower]'
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
