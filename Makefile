PYTHON ?= python3

.PHONY: install demo test benchmark

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) scripts/demo.py

test: install
	$(PYTHON) -m pytest -q -ra

benchmark: install
	$(PYTHON) scripts/benchmark.py
