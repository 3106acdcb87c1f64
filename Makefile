# SRMF for QGIS — set-up, demo, tests, benchmarks.
# `make demo` and `make test` do all the set-up themselves on a fresh Debian 12 machine.

SHELL := /bin/bash
PYTHON_SYS ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-qgis qgis-providers gdal-bin python3-gdal python3-venv python3-pip xvfb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEFAULT_MODEL := resources/models/default.srmf
export QT_QPA_PLATFORM ?= offscreen
export PYTHONPATH := $(CURDIR):/usr/share/qgis/python/plugins:$(PYTHONPATH)

.PHONY: install apt venv default-model demo test test-core bench clean

install: apt venv default-model

# Debian packages: QGIS 3.22 with its Python bindings, GDAL, Xvfb for UI tests.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

# A virtual environment that sees Debian's QGIS and GDAL bindings (--system-site-packages).
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt | apt
	test -x $(PY) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The embedded default model (an untrained placeholder until a trained one is committed).
default-model: $(DEFAULT_MODEL)

$(DEFAULT_MODEL): | $(VENV)/.installed
	$(PY) -m core.default_model $@

demo: install
	$(PY) -m core segment ../shared/data/openearthmap_adelaide/adelaide_2.tif demo-output/adelaide_2_classes.tif \
	  --probabilities demo-output/adelaide_2_confidence.tif --overwrite
	$(PY) -m core info $(DEFAULT_MODEL)

test: install
	$(PY) -m pytest -p no:pytest_qgis -q tests/core

test-core: install
	$(PY) -m pytest -p no:pytest_qgis -q tests/core

bench: install
	$(PY) -m bench.segment

clean:
	rm -rf demo-output .pytest_cache
