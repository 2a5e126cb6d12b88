# The whole set-up is `make demo` and `make test` (`make test-fast` leaves out the few tests marked slow). Both test
# targets run one pytest-xdist worker per core.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmforge-installed
TORCH  := torch==2.13.0

.PHONY: demo test test-fast lint bench clean

$(PY):
	python3 -m venv $(VENV)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,eval,rag]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmforge demo

# The chat page's browser test drives the system Chromium (Debian/Ubuntu: sudo apt-get install chromium); without one
# it is skipped, saying so.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -n auto --durations=15

# everything but the few tests marked slow (the demo, SIGKILL resume, DDP, torch.compile...), one worker per core:
# under a minute on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n auto

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode_speed.py

clean:
	rm -rf runs report .pytest_cache
