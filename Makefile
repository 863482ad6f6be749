# casfs: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) -m casfs.demo

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check .
