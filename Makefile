# casfs: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) -m casfs.demo

test: install
	$(PYTHON) -m pytest -q

lint: install
	ruff check .
	$(PYTHON) -m mypy

# Benchmarks (docs/benchmarks.md). `make bench`: the full cold-start suite (torch image,
# 3 runs per scenario, ~15-20 min); `make bench-quick`: the small image, a few minutes;
# `make bench-all`: cold start, indexing and read path. BENCH_ARGS go to the cold-start
# suite, e.g. `make bench BENCH_ARGS="--latency-ms 10"`.
BENCH_ARGS ?= --no-prefetch-row

.PHONY: bench bench-quick bench-all bench-deps

bench-deps: install
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q matplotlib

bench: bench-deps
	$(PYTHON) -m benchmarks.coldstart $(BENCH_ARGS)

bench-quick: bench-deps
	$(PYTHON) -m benchmarks.coldstart --quick $(BENCH_ARGS)

bench-all: bench
	$(PYTHON) -m benchmarks.indexing
	$(PYTHON) -m benchmarks.readpath
