# ernie-lab: `make lab` opens the notebooks, `make test` runs every test and notebook.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Offline by design: nothing in the tests or notebooks may touch a model hub.
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ERNIE_LAB_FAST=1 MPLBACKEND=Agg PYTHONHASHSEED=0

# Notebook sources are notebooks/NN_name.py (jupytext py:percent); every .ipynb is made from them.
NB_TEST_DIR := build/nbtest
HTML_DIR    := build/html

.PHONY: lab test test-fast test-nbval html notebooks notebooks-build figures bench interop train-tiny clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

# Missing notebooks/*.ipynb are made from their .py; existing ones (a student's work) are never overwritten.
# JupyterLab pairs each .ipynb with its .py (notebooks/jupytext.toml): saving writes both, outputs only to the .ipynb.
# scripts/lab.py holds the lab's configuration (serves the checkout so ../figures/ loads, opens on notebooks/,
# no news pop-up, widget state saved); tests/test_browser.py starts the lab through it too.
# `make lab FAST=1` runs the notebooks in fast mode.
lab: notebooks
	$(if $(FAST),ERNIE_LAB_FAST=$(FAST)) $(PY) scripts/lab.py

notebooks: $(STAMP)
	$(PY) scripts/build_notebooks.py --missing

# Fresh notebooks without outputs, from the .py sources, into $(NB_TEST_DIR) (the tests run these).
notebooks-build: $(STAMP)
	$(PY) scripts/build_notebooks.py --into $(NB_TEST_DIR)

# Every notebook executed once, in fast mode, from the fresh copies: an error in any cell fails (as
# nbval --nbval-lax does), and the executed notebooks become a static HTML site in $(HTML_DIR)
# (figures inline, no JavaScript from a CDN) that a lecturer previews without running anything.
html: notebooks-build
	$(TEST_ENV) $(PY) scripts/build_html.py --notebooks $(NB_TEST_DIR) --out $(HTML_DIR)

# The notebooks run once (`make html`), then pytest over tests/, which also checks the rendered pages.
test: html
	$(TEST_ENV) ERNIE_LAB_HTML=$(HTML_DIR) $(PY) -m pytest tests/ -p no:cacheprovider

# The notebooks under nbval instead (one pytest item per cell).
test-nbval: notebooks-build
	$(TEST_ENV) $(PY) -m pytest $(NB_TEST_DIR) --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p no:cacheprovider

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests/ -x -q -p no:cacheprovider

figures: $(STAMP)
	MPLBACKEND=Agg $(PY) scripts/make_figures.py

# llama.cpp is built from source for this CPU (-march=native) but without its AMX kernels: on an Intel Xeon VM
# whose CPU lists AMX, llama.cpp's AMX repacking of Q4_0 / Q8_0 weights crashed (SIGSEGV) on load.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE := $(if $(filter x86_64,$(shell uname -m)),CMAKE_ARGS="-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'")

bench: $(STAMP)
	$(LLAMA_CMAKE) $(PY) -m pip install --quiet -c requirements.lock -e ".[bench]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/decode.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/moe.py
	HF_HUB_OFFLINE=1 nice -n 15 $(PY) benchmarks/quant.py
	HF_HUB_OFFLINE=1 nice -n 15 $(PY) benchmarks/long_context.py

# Real tools read the kit's exports: llama.cpp (its own convert_hf_to_gguf.py, f32 GGUF, f32 KV cache) and
# transformers decode greedily the tokens ernie-lab decodes, on the tiny text model, a merged-LoRA export and
# a small text MoE; writes benchmarks/results/interop.json. The `bench` extra builds llama-cpp-python (~15 min).
interop: $(STAMP)
	$(LLAMA_CMAKE) $(PY) -m pip install --quiet -c requirements.lock -e ".[bench]"
	HF_HUB_OFFLINE=1 nice -n 15 $(PY) scripts/interop.py

# Retrain the shipped tiny models from scratch (deterministic; about 30 min on 2 cores) and rewrite their
# TRAINING.md, metrics.json and curves. Weights are binaries: commit a retrained model only when it is final.
train-tiny: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/train_tiny.py text vl

clean:
	rm -rf $(VENV) .pytest_cache $(NB_TEST_DIR) $(HTML_DIR)
