# Set-up and everyday commands. Everything installs into a local venv (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA ?= $(if $(WSI_IDF_DATA),$(WSI_IDF_DATA),../shared/data)
SLIDE ?= $(DATA)/slides/cmu-1-small-region.svs
WSI := $(VENV)/bin/wsi-idf

.PHONY: demo test test-slow bench bench-pack bench-scale bench-progressive ablate train learning-curve clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU build; a looser pin pulls several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## pack a real slide, verify every pixel against it, read a region back
	$(WSI) demo
	$(WSI) pack $(SLIDE) -o demo/slide.zarr --overwrite
	$(WSI) verify demo/slide.zarr --source $(SLIDE)
	$(WSI) info demo/slide.zarr
	$(WSI) pack $(SLIDE) -o demo/slide-idf.zarr --codec idf --overwrite
	$(WSI) verify demo/slide-idf.zarr --source $(SLIDE)
	$(WSI) region demo/slide.zarr --level 0 --x 1000 --y 1200 --width 512 --height 512 -o demo/region.png --overwrite

test: $(STAMP)  ## the default test suite (CI runs this)
	$(PY) -m pytest -q -m "not slow" wsi_idf tests

test-slow: $(STAMP)  ## long tests
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)  ## codec benchmark table against JPEG XL, JPEG 2000, WebP, JPEG-LS, PNG
	$(PY) benchmarks/bench_codec.py --out results

bench-pack: $(STAMP)  ## whole slides through the Dask pipeline: time, size, peak memory
	$(PY) benchmarks/bench_pack.py --out results

bench-progressive: $(STAMP)  ## a 2048x2048 real region from 1, 2, 3 flow levels: bytes read, time, PSNR, strip
	$(PY) benchmarks/bench_progressive.py --out results

GIGAPIXELS ?= 4
bench-scale: $(STAMP)  ## a generated 4-gigapixel slide of real tissue: Mpx/s per stage, peak RSS per process
	$(PY) benchmarks/bench_scale.py --gigapixels $(GIGAPIXELS) --out results

ablate: $(STAMP)  ## same-budget ablations of model v2 (5 CPU-minutes each, one thread)
	$(PY) benchmarks/ablate_v2.py --cpu-minutes 5 --out results

MINUTES ?= 90
train: $(STAMP)  ## continue training the shipped fast model (training/, one thread, resumable), then export it
	$(PY) pipelines/train_models.py fast --threads 1 --out training --no-export --quantize-from 7500 --minutes $(MINUTES)
	$(PY) pipelines/train_models.py fast --out training --export-only

learning-curve: $(STAMP)  ## the shipped model's validation curve as a table and plot in docs/benchmarks
	$(PY) benchmarks/learning_curve.py training/fast.log.jsonl --reference 3.133 --out docs/benchmarks

clean-venv:
	rm -rf $(VENV)
