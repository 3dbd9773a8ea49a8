PYTHON ?= python3

.PHONY: install demo test benchmark gpu-check

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) scripts/demo.py

test: install
	$(PYTHON) -m pytest -q -ra -n 2 --dist loadgroup --no-loadscope-reorder

benchmark: install
	$(PYTHON) scripts/benchmark.py

gpu-check: install
	$(PYTHON) scripts/gpu_check.py
