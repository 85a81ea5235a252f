# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# ffcv builds against the first three; the metrics test starts its own Prometheus on loopback.
DEB_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config prometheus
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR := runs/demo

.PHONY: demo tune-demo test lint bench deb-packages clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

# ffcv compiles against OpenCV and libturbojpeg, so the Debian packages come first.
$(VENV)/.installed-dev: pyproject.toml | deb-packages
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,ffcv]'
	touch $@

deb-packages:
	@dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(DEB_PACKAGES); }

# Generated data; all-modality and Sentinel-2-only pretraining of the same budget (2 CPU workers on a
# local Ray instance); reconstructions and loss curves; then, through the benchmark suite, linear probes of
# both encoders and of a random one on a land-cover task held out from pretraining: a second generated folder
# (same synthetic world, other tiles), whose 400 test tiles score the probes with 95 % intervals.
demo: $(VENV)/.installed
	$(VENV)/bin/mpmae synth runs/demo-data --tiles 1000 --size 64 --seed 0 --overwrite
	$(VENV)/bin/mpmae synth runs/demo-probe --tiles 4000 --size 64 --seed 1 --overwrite
	$(VENV)/bin/mpmae inspect runs/demo-data
	$(VENV)/bin/mpmae pretrain --config configs/demo.yaml
	$(VENV)/bin/mpmae pretrain --config configs/demo.yaml model.targets=S2 run.name=demo-s2
	$(VENV)/bin/mpmae visualize $(DEMO_DIR) runs/demo-data --out $(DEMO_DIR)/viz
	rm -rf runs/demo-suite
	$(VENV)/bin/mpmae benchmark --config configs/demo_suite.yaml
	@echo "demo outputs: checkpoints in $(DEMO_DIR)/epoch-* and runs/demo-s2/epoch-*, pictures and loss curves"
	@echo "in $(DEMO_DIR)/viz, the probe comparison in runs/demo-suite (summary.md, results.csv, summary.png)"

# A Ray Tune sweep over mask ratio, loss weighting and learning rate on the demo data (about 15 min).
tune-demo: $(VENV)/.installed
	[ -d runs/demo-data ] || $(VENV)/bin/mpmae synth runs/demo-data --tiles 1000 --size 64 --seed 0
	$(VENV)/bin/mpmae tune --config configs/tune_demo.yaml

test: $(VENV)/.installed-dev lint
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check mpmae tests bench
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-dev
	$(PY) bench/data_loading.py
	$(PY) bench/model_step.py
	$(PY) bench/train_throughput.py
	$(PY) bench/checkpoint_stall.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
