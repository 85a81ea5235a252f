# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR := runs/demo

.PHONY: demo test lint bench deb-packages clean

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
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(DEB_PACKAGES); }

demo: $(VENV)/.installed
	$(VENV)/bin/mpmae synth $(DEMO_DIR)/data --tiles 1000 --size 64 --seed 0 --overwrite
	$(VENV)/bin/mpmae inspect $(DEMO_DIR)/data

test: $(VENV)/.installed-dev lint
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check mpmae tests bench

bench: $(VENV)/.installed-dev
	$(PY) bench/data_loading.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
