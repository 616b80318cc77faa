# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BACKBONE ?= models/vit-fmnist.pth
export HF_HUB_OFFLINE := 1

.PHONY: setup system-packages backbone demo compare count test clean

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

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs *.egg-info
