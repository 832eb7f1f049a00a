# make test  - set up everything (virtual environment, Python and Debian packages) and run the tests
# make demo  - set up everything and run the demo: baseline vs SAR on a small Fashion-MNIST subset
# make bench - the benchmark scripts (timings printed side by side)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_REQUIREMENTS ?= requirements/torch.txt
STAMP := $(VENV)/.sarvit-installed
SYSTEM_STAMP := $(VENV)/.sarvit-system-deps

.PHONY: setup test demo bench clean

setup: $(STAMP) $(SYSTEM_STAMP)

$(STAMP): pyproject.toml $(TORCH_REQUIREMENTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_REQUIREMENTS),$(PY) -m pip install -qq -r $(TORCH_REQUIREMENTS))
	$(PY) -m pip install -qq -e ".[test]"
	# ImageNet-C corruptions; --no-deps: it asks for the GUI OpenCV build, sarvit ships the headless one
	$(PY) -m pip install -qq --no-deps "imagecorruptions-imaug==1.1.5"
	# DINO and MoCo v3 parts (heads, DINO loss, multi-crop); --no-deps: the rest of its requirements is Lightning
	$(PY) -m pip install -qq --no-deps "lightly==1.6.0"
	@touch $@

$(SYSTEM_STAMP): scripts/install-system-deps.sh | $(STAMP)
	scripts/install-system-deps.sh
	@touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/sarvit demo

bench: setup
	$(PY) -m pip install -qq -e ".[test,bench]"
	$(PY) benchmarks/spatial_entropy.py
	$(PY) benchmarks/step_overhead.py --model vit_tiny_patch16_224
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
