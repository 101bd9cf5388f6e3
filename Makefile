# Set-up and everyday commands. Everything installs into a local venv (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU build; a looser pin pulls several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## encode and decode real H&E patches, print sizes
	$(VENV)/bin/wsi-idf demo

test: $(STAMP)  ## the default test suite (CI runs this)
	$(PY) -m pytest -q -m "not slow" wsi_idf tests

test-slow: $(STAMP)  ## long tests
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)  ## codec benchmark table against JPEG XL, JPEG 2000, WebP, JPEG-LS, PNG
	$(PY) benchmarks/bench_codec.py --out results

clean-venv:
	rm -rf $(VENV)
