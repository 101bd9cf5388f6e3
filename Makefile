# Set-up and everyday commands. Everything installs into a local venv (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA ?= $(if $(WSI_IDF_DATA),$(WSI_IDF_DATA),../shared/data)
SLIDE ?= $(DATA)/slides/cmu-1-small-region.svs
WSI := $(VENV)/bin/wsi-idf

.PHONY: bench-adapt bench-patch-modes screenshots bench-serve demo test test-slow bench bench-coders bench-pack bench-region bench-scale bench-progressive ablate train learning-curve clean-venv gpu-wheels gpu-check

$(STAMP): pyproject.toml wsi_idf/coding/_rans.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU build; a looser pin pulls several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## pack a real slide, verify every pixel against it, restore the file byte for byte, read a region back
	$(WSI) demo
	$(WSI) pack $(SLIDE) -o demo/slide.zarr --overwrite
	$(WSI) verify demo/slide.zarr --source $(SLIDE)
	$(WSI) info demo/slide.zarr
	$(WSI) restore demo/slide.zarr -o demo/restored$(suffix $(SLIDE)) --overwrite
	cmp demo/restored$(suffix $(SLIDE)) $(SLIDE) && echo "restored file identical to the source"
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

bench-coders: $(STAMP)  ## entropy coders on real latents: constriction as used, the whole path, a C prototype
	$(PY) benchmarks/bench_coders.py --patches 256

bench-region: $(STAMP)  ## 1024x1024 region reads through plain zarr vs tifffile and OpenSlide, quiet and with one core busy
	$(PY) benchmarks/bench_region.py --out results

bench-progressive: $(STAMP)  ## a 2048x2048 real region from 1, 2, 3 flow levels: bytes read, time, PSNR, strip
	$(PY) benchmarks/bench_progressive.py --out results

GIGAPIXELS ?= 4
bench-scale: $(STAMP)  ## a generated 4-gigapixel slide of real tissue: Mpx/s per stage, peak RSS per process
	$(PY) benchmarks/bench_scale.py --gigapixels $(GIGAPIXELS) --out results

ADAPT_MINUTES ?= 5
bench-adapt: $(STAMP)  ## unseen slides packed with --adapt 5 and the smallest-of mode vs JPEG XL e9 per patch (~15 min)
	$(PY) benchmarks/bench_adapt.py --minutes $(ADAPT_MINUTES) --out results

bench-patch-modes: $(STAMP)  ## where the smallest-of mode tries JPEG XL, and at what effort: bytes saved vs time
	$(PY) benchmarks/bench_patch_modes.py

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

# The GPU machine (Python 3.12, torch) lacks these; exact versions of this venv's, one of each.
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 dask==2026.8.0 \
	distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0 tornado==6.6.1 \
	constriction==0.5.0 importlib_metadata==10.2.0
GPU_PLATFORMS := $(foreach n,17 24 27 28 31 34,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: $(STAMP)  ## here, on CPU: the wheels the GPU machine lacks (.whl/) and a small copy of the data (.gpu-data/)
	mkdir -p .whl && rm -f .whl/*.whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	rm -rf .gpu-data && $(PY) benchmarks/gpu_check.py --stage .gpu-data
	du -sh .whl .gpu-data

DEVICE ?= cuda
GPU_OUT ?= $(if $(OUT),$(OUT),results/gpu-check)
ifeq ($(DEVICE),cpu)
gpu-check: $(STAMP)  ## CUDA-vs-CPU exactness, GPU pack throughput, a training burst (DEVICE=cpu SMALL=1: a 1-minute CPU run)
	$(PY) benchmarks/gpu_check.py --device cpu $(if $(SMALL),--small) --out $(GPU_OUT)
else
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	# the compiled rANS twin, when the machine has a compiler and Python's headers (else constriction codes)
	-cc -O2 -shared -fPIC -I"$$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		wsi_idf/coding/_rans.c -o "wsi_idf/coding/_rans$$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" \
		|| echo "no compiled coder here: constriction writes the same bytes"
	PYTHONPATH=/tmp/site:. WSI_IDF_DATA=$(CURDIR)/.gpu-data PYTHONUNBUFFERED=1 \
		python3 benchmarks/gpu_check.py --device $(DEVICE) $(if $(SMALL),--small) --out $(GPU_OUT)
endif

screenshots: $(STAMP)  ## the README's catalog and viewer screenshots, made by the browser test (chromium)
	WSI_IDF_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_serve.py -k browser

bench-serve: $(STAMP)  ## wsi-idf serve: time to first tile, warm tile latency (IDF and kept tiles), RSS after a minute of browsing
	$(PY) benchmarks/bench_serve.py --out results
