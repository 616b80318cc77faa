# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BACKBONE ?= models/vit-fmnist.pth
# The device's environment: the edge extra only (plain onnxruntime, no torch), as on a Raspberry Pi.
EDGE_VENV ?= .venv-edge
EDGE_FIXTURES ?= build/edge-fixtures
export HF_HUB_OFFLINE := 1

.PHONY: setup system-packages backbone demo compare count bench-device test clean

# Debian packages: the Fashion-MNIST files the backbone is pretrained on.
system-packages:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

$(BIN)/sfp-sim: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: system-packages $(BIN)/sfp-sim

# The in-house backbone: a small ViT pretrained on Fashion-MNIST (about 8 minutes on 2 CPU cores).
$(BACKBONE): | setup
	$(BIN)/sfp-pretrain --out $@

backbone: $(BACKBONE)

# The main job on defaults that fit a laptop: SFPrompt against federated full fine-tuning on MNIST 5k.
demo: backbone
	$(BIN)/python bench/compare.py --methods sfprompt,fl --rounds 5 --alpha 0.5 --out runs/demo

# All methods and ablations, 10 clients, Dirichlet 0.5, 10 rounds (the foundation's comparison table).
compare: backbone
	$(BIN)/python bench/compare.py --methods sfprompt,sfprompt-no-prune,sfprompt-no-local,fl,fedprompt,sfl \
		--rounds 10 --alpha 0.5 --out runs/compare

# The paper's counting at ViT-B/16 scale, nothing trained.
count: setup
	$(BIN)/sfp-count --model vit_base_patch16_224 --classes 10 --samples 500 --keep 0.5 --epochs 1

# On-device step time and peak memory, portable backend against PyTorch, ViT-Tiny and ViT-B/16 (about 3 min).
bench-device: setup
	OMP_NUM_THREADS=1 $(BIN)/python bench/device_step.py

$(EDGE_VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/pip install -q -e '.[edge]' pytest
	touch $@

# Bundles are exported and the PyTorch reference steps recorded in the main environment; the device tests then
# run against them in the torch-free one (and in the main one too).
test: setup $(EDGE_VENV)/installed
	rm -rf $(EDGE_FIXTURES)
	OMP_NUM_THREADS=1 $(BIN)/python tests/edge/make_fixtures.py $(EDGE_FIXTURES)
	SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) $(BIN)/python -m pytest -q
	$(EDGE_VENV)/bin/python -c "import importlib.util as u, onnxruntime; print('device environment: torch importable:', u.find_spec('torch') is not None, '| onnxruntime', onnxruntime.__version__)"
	SFP_DEVICE_ENV=1 SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) $(EDGE_VENV)/bin/python -m pytest -q -rP tests/edge

clean:
	rm -rf $(VENV) $(EDGE_VENV) build runs *.egg-info
