# cktf: `make demo` runs the main job on the default data, `make test` runs the tests.
# Both create .venv and install the package on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist
# FAISS=gpu installs faiss-gpu instead of faiss-cpu.
FAISS ?= cpu
RUNS ?= runs

.PHONY: setup test demo lint fuzz docs docs-serve clean-runs

setup: $(VENV)/.installed fashion-data

# '.[dev]' includes the optional timm extra, which the tests need.
# torch/torchvision come from the package registry (their CUDA build also runs on CPU). pip's config
# files and PIP_FIND_LINKS are ignored here so a local CPU-only torch wheel is never mixed in.
PIP_ENV := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null CKTF_FAISS=$(FAISS)
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/pip install -q -e '.[dev$(if $(filter gpu,$(FAISS)),$(comma)gpu,)]'
	touch $@
comma := ,

.PHONY: fashion-data
fashion-data:
	@if [ ! -e $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist; \
		else sudo -n apt-get install -y -q dataset-fashion-mnist || \
			echo "warning: could not install dataset-fashion-mnist; pass --data.root DIR with the IDX files"; fi; \
	fi

test: setup
	$(BIN)/pytest -q

# The fuzz tests with many random examples (the hypothesis profile 'fuzz': 5000 per test instead of CI's 150
# fixed ones). Run it after changing the config loader or the command line; pin each failure with @example.
fuzz: setup
	CKTF_HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q -p no:cacheprovider tests/test_config_fuzz.py \
		--hypothesis-show-statistics

# The documentation site (mkdocs.yml, pages under docs/), built --strict into the ignored site/ folder: a broken
# link, a missing page or a stale anchor fails. docs/reference/ is generated: python -m transfer.docs_reference.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

lint: setup
	$(BIN)/ruff check transfer linear_probe tests benchmarks

# The demo: teacher -> KD, CRD, CKTF transfers -> probes -> controls -> comparison (reports/fashion_lowres).
# Finished runs are reused and interrupted ones resumed. `make demo SEEDS=3` gives mean ± std over 3 seeds.
SEEDS ?= 1
REPORT ?= reports/fashion_lowres
demo: setup
	$(BIN)/cktf demo --runs $(RUNS) --seeds $(SEEDS) --out $(REPORT)

clean-runs:
	rm -rf $(RUNS)
