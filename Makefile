# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BACKBONE ?= models/vit-fmnist.pth
# The device's environment: the edge extra only (plain onnxruntime, no torch), as on a Raspberry Pi.
EDGE_VENV ?= .venv-edge
# The same with the oldest onnxruntime the edge extra allows (a Jetson on JetPack 6 gets an older one than x86), and
# the oldest paho-mqtt (wire_protocol/mqtt_client.py overrides some of its internals).
EDGE_OLDEST_VENV ?= .venv-edge-oldest
ORT_OLDEST := $(shell sed -n 's/^ *onnxruntime>=\([0-9.]*\)$$/\1/p' setup.cfg | head -1)
PAHO_OLDEST := $(shell sed -n 's/^ *paho-mqtt>=\([0-9.]*\),.*$$/\1/p' setup.cfg | head -1)
EDGE_FIXTURES ?= build/edge-fixtures
# The training backend's environment: onnxruntime-training-cpu, no torch (builds and runs ORT training artifacts).
ORT_TRAINING_VENV ?= .venv-ort-training
# An emulated Linux aarch64 CPython with the edge extra's aarch64 wheels (tests/aarch64/make_env.sh): the device
# tests run there too, against bundles exported here.
AARCH64_ENV ?= build/aarch64
export HF_HUB_OFFLINE := 1

.PHONY: setup system-packages emulator-packages browser-packages cluster-packages dashboard-assets backbone demo simulate compare sweep count bench bench-quick bench-device bench-serving bench-transport bench-chaos ort-training-env test clean

# Debian packages: the Fashion-MNIST files the backbone is pretrained on, and the Mosquitto broker.
system-packages:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ ! -x /usr/sbin/mosquitto ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist mosquitto; \
	fi

# Debian packages for the emulated aarch64 device: qemu's user-mode emulator and debootstrap.
emulator-packages:
	@if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq qemu-user-static debootstrap; \
	fi

# Debian's Chromium: the fleet page is tested in a real (headless) browser.
browser-packages:
	@if ! command -v chromium >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	fi

# Debian's ejabberd: a real clustered MQTT 5 broker, two nodes on loopback (tests/ejabberd_cluster.py).
cluster-packages:
	@if ! command -v ejabberdctl >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq ejabberd; \
	fi

# The fleet page's browser libraries (MQTT.js, Chart.js), from npm at the versions its lock file pins.
DASHBOARD_ASSETS := cloud_server/fleet_page/node_modules/.installed
$(DASHBOARD_ASSETS): cloud_server/fleet_page/package.json cloud_server/fleet_page/package-lock.json
	cd cloud_server/fleet_page && npm ci --no-audit --no-fund --loglevel=error
	touch $@
dashboard-assets: $(DASHBOARD_ASSETS)

$(AARCH64_ENV)/python: tests/aarch64/make_env.sh setup.cfg | emulator-packages setup
	PIP=$(BIN)/pip tests/aarch64/make_env.sh $(AARCH64_ENV)

$(BIN)/sfp-sim: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: system-packages $(BIN)/sfp-sim

# The in-house backbone: a small ViT pretrained on Fashion-MNIST. It ships in models/ with its hash (checked by
# tests/test_backbone.py); this rule only remakes it when it is missing (`sfp-pretrain`, 2 threads: about 5 minutes
# on an idle 2-core machine, bit for bit the shipped file).
$(BACKBONE): | setup
	$(BIN)/sfp-pretrain --out $@

backbone: $(BACKBONE)

# The product, on this machine: a Mosquitto broker, `sfp-cloud serve`, 4 devices (`sfp-edge`) each with its own
# non-IID share of MNIST 5k, 5 rounds; progress on screen, a table and a plot in runs/federation-demo/.
demo: backbone $(DASHBOARD_ASSETS)
	$(BIN)/sfp-cloud demo --devices 4 --rounds 5 --out runs/federation-demo

# The reference federation in one process: SFPrompt against federated full fine-tuning on MNIST 5k.
simulate: backbone
	$(BIN)/python bench/compare.py --methods sfprompt,fl --rounds 5 --partitions 0.5 --out runs/demo

# The comparison as the benchmark suite runs it: SFPrompt, split-only, the paper's phase 1 and FL over three seeds,
# the ablations and the other baselines over one, IID / Dirichlet 0.5 / 0.1, each beside its central ceiling,
# 10 rounds (about 2 hours on 2 cores; finished runs are reused).
compare: backbone
	$(BIN)/python bench/suite.py --only comparison

# SFPrompt at every split (head 0/1, tail 0/1/2, prompts 10/50) beside its ceiling: table, Pareto plot, a split per
# profile (about 40 minutes on 2 cores).
sweep: backbone
	$(BIN)/python bench/suite.py --only split-sweep

# The paper's counting at its scale (ViT-B/16 and ViT-L/16), nothing trained.
count: setup
	$(BIN)/python bench/counting.py --out runs/counting

# The whole benchmark suite (hours on 2 cores; bench/results/ and bench/RESULTS.md), and a quick variant that only
# shows every part runs (minutes; runs/bench-quick/RESULTS.md).
bench: backbone $(ORT_TRAINING_VENV)/installed
	SFP_ORT_TRAINING_PYTHON=$(ORT_TRAINING_VENV)/bin/python $(BIN)/python bench/suite.py

bench-quick: backbone $(ORT_TRAINING_VENV)/installed
	SFP_ORT_TRAINING_PYTHON=$(ORT_TRAINING_VENV)/bin/python $(BIN)/python bench/suite.py --quick

# On-device step time and peak memory, both backends against PyTorch, ViT-Tiny and ViT-B/16 (about 5 min), then a
# whole device round with the patch tokens embedded once per round against once per split batch.
bench-device: setup $(ORT_TRAINING_VENV)/installed
	OMP_NUM_THREADS=1 $(BIN)/python bench/device_step.py --round-samples 0 --training-python $(ORT_TRAINING_VENV)/bin/python
	OMP_NUM_THREADS=1 $(BIN)/python bench/device_step.py --batches none --round-samples 256 --round-reps 3 \
		--training-python $(ORT_TRAINING_VENV)/bin/python --out bench/results/device-round

# The server's serving path against its bare body (1, 8, 64 simulated devices), and the protocol's goodput over
# Mosquitto against raw paho publishes (64 KB to 20 MB); a few minutes each.
bench-serving: setup
	$(BIN)/python bench/serving.py --devices 1,8,64 --batch 2 --seconds 40

bench-transport: setup
	$(BIN)/python bench/transport.py --latency
	$(BIN)/python bench/transport.py --trials 9

# A secured federation (4 device processes) with faults injected at random for 20 rounds, against the fault-free
# run with the same seed (a few minutes; bench/results/chaos/).
bench-chaos: backbone
	$(BIN)/python bench/chaos.py --rounds 20 --devices 4

$(EDGE_VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/pip install -q -e '.[edge]' pytest
	touch $@

$(EDGE_OLDEST_VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(EDGE_OLDEST_VENV)
	$(EDGE_OLDEST_VENV)/bin/pip install -q -e '.[edge]' pytest 'onnxruntime==$(ORT_OLDEST)' 'paho-mqtt==$(PAHO_OLDEST)'
	touch $@

$(ORT_TRAINING_VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(ORT_TRAINING_VENV)
	$(ORT_TRAINING_VENV)/bin/pip install -q -e '.[ort-training]' pytest
	touch $@

# Needed by `sfp-export bundle --backend training` (it finds $(ORT_TRAINING_VENV)/bin/python).
ort-training-env: $(ORT_TRAINING_VENV)/installed

# Bundles of both backends are exported and the PyTorch reference steps recorded in the main environment; the
# device tests then run in each backend's torch-free environment (portable ones in the main one too).
test: setup browser-packages cluster-packages $(DASHBOARD_ASSETS) $(EDGE_VENV)/installed $(EDGE_OLDEST_VENV)/installed $(ORT_TRAINING_VENV)/installed $(AARCH64_ENV)/python
	rm -rf $(EDGE_FIXTURES)
	OMP_NUM_THREADS=1 SFP_ORT_TRAINING_PYTHON=$(ORT_TRAINING_VENV)/bin/python \
		$(BIN)/python tests/edge/make_fixtures.py $(EDGE_FIXTURES)
	SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) SFP_ORT_TRAINING_PYTHON=$(ORT_TRAINING_VENV)/bin/python $(BIN)/python -m pytest -q
	$(EDGE_VENV)/bin/python -c "import importlib.util as u, onnxruntime; print('device environment: torch importable:', u.find_spec('torch') is not None, '| onnxruntime', onnxruntime.__version__)"
	SFP_DEVICE_ENV=portable SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) $(EDGE_VENV)/bin/python -m pytest -q -rP tests/edge
	$(EDGE_OLDEST_VENV)/bin/python -c "import onnxruntime as o, paho.mqtt as p; assert o.__version__.startswith('$(ORT_OLDEST)'), o.__version__; assert p.__version__.startswith('$(PAHO_OLDEST)'), p.__version__; print('oldest onnxruntime allowed:', o.__version__, '| oldest paho-mqtt allowed:', p.__version__)"
	SFP_DEVICE_ENV=portable SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) $(EDGE_OLDEST_VENV)/bin/python -m pytest -q tests/edge tests/test_mqtt_client.py tests/test_link.py
	$(AARCH64_ENV)/python -c "import platform; assert platform.machine() == 'aarch64', platform.machine()"
	SFP_DEVICE_ENV=portable SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) $(AARCH64_ENV)/python -m pytest -q -p no:cacheprovider tests/edge
	SFP_DEVICE_ENV=training SFP_EDGE_FIXTURES=$(EDGE_FIXTURES) $(ORT_TRAINING_VENV)/bin/python -m pytest -q -rP tests/edge

clean:
	rm -rf $(VENV) $(EDGE_VENV) $(EDGE_OLDEST_VENV) $(ORT_TRAINING_VENV) build runs *.egg-info
