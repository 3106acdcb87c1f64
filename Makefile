# SRMF for QGIS — set-up, demo, tests, benchmarks.
# `make demo` and `make test` do all the set-up themselves on a fresh Debian 12 machine.

SHELL := /bin/bash
PYTHON_SYS ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := gdal-bin python3-gdal python3-scipy python3-venv python3-pip xvfb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEFAULT_MODEL := resources/models/default.srmf
export QT_QPA_PLATFORM ?= offscreen
export PYTHONPATH := $(CURDIR):/usr/share/qgis/python/plugins:$(PYTHONPATH)

.PHONY: install apt venv default-model demo test test-core bench gpu-check clean

install: apt venv default-model

# Debian packages: QGIS 3.40 LTR from Debian's bookworm-backports suite (the suite is added for Debian's
# own archive if missing) with its Python bindings, GDAL, Xvfb for UI tests. Debian 12's own QGIS 3.22 is
# kept for `make test-qgis-322` (qgis-322 below): its versioned libraries (libqgis-*3.22.16) install
# beside 3.40's; only its unversioned packages would replace 3.40's, so those are unpacked into a folder.
BACKPORTS_LIST := /etc/apt/sources.list.d/srmf-bookworm-backports.sources
QGIS_BACKPORTS := qgis python3-qgis qgis-providers
QGIS322_VERSION := 3.22.16+dfsg-1
QGIS322_LIBS := libqgis-core3.22.16 libqgis-gui3.22.16 libqgis-analysis3.22.16 libqgis-3d3.22.16 \
  libqgis-server3.22.16 libqgis-native3.22.16 libqgispython3.22.16
QGIS_VERSION_WANTED := 3.40
apt:
	@if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then \
	  echo "Adding Debian's bookworm-backports suite ($(BACKPORTS_LIST))"; \
	  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	    | $(SUDO) tee $(BACKPORTS_LIST) >/dev/null; \
	  $(SUDO) apt-get update -q; \
	fi
	@missing=$$(for p in $(APT_PACKAGES) $(QGIS322_LIBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@installed=$$(dpkg-query -W -f='$${Version}' python3-qgis 2>/dev/null); \
	case "$$installed" in $(QGIS_VERSION_WANTED).*) ;; *) \
	  echo "Installing QGIS $(QGIS_VERSION_WANTED) from bookworm-backports (found $$installed)"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
	    -t bookworm-backports $(QGIS_BACKPORTS);; \
	esac

# QGIS 3.22's unversioned packages (Python bindings, providers, resources) unpacked into $(QGIS322); the
# 3.22 run points QGIS_PREFIX_PATH and PYTHONPATH there and loads the installed libqgis-*3.22.16.
QGIS322 ?= $(CURDIR)/.qgis-3.22
QGIS322_DEBS := python3-qgis python3-qgis-common qgis-providers qgis-providers-common qgis-common
.PHONY: qgis-322
qgis-322: $(QGIS322)/.unpacked

$(QGIS322)/.unpacked: | apt
	rm -rf $(QGIS322) && mkdir -p $(QGIS322)/debs
	cd $(QGIS322)/debs && apt-get download -q $(foreach p,$(QGIS322_DEBS),$(p)=$(QGIS322_VERSION)) 2>&1 \
	  | grep -v "unsandboxed as root" || true
	for d in $(QGIS322)/debs/*.deb; do dpkg-deb -x "$$d" $(QGIS322); done
	rm -rf $(QGIS322)/debs
	test -f $(QGIS322)/usr/lib/python3/dist-packages/qgis/core/__init__.py
	touch $@

# A virtual environment that sees Debian's QGIS and GDAL bindings (--system-site-packages).
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt | apt
	test -x $(PY) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The embedded default model is committed (trained on the Dubai tiles: resources/models/README.md); this
# rule only runs when it is missing, and then builds a clearly labelled UNTRAINED placeholder.
default-model: $(DEFAULT_MODEL)

$(DEFAULT_MODEL): | $(VENV)/.installed
	$(PY) -m core.model.default $@

# The main job headless: QGIS Processing srmf:segment on a real GeoTIFF with the default model; writes the
# styled class raster (+ .qml), polygons, the area table and a PNG quick-look into demo-output/.
DEMO_INPUT ?= ../shared/data/deepforest_neon_osbs/OSBS_029.tif
demo: install
	SRMF_PYTHON=$(abspath $(PY)) $(PY) scripts/demo.py $(DEMO_INPUT) --output demo-output

test: install qgis-322
	$(PY) -m pytest -p no:pytest_qgis -q tests/core
	$(QGIS_TESTS)
	$(DESKTOP_TESTS)
	$(QGIS322_TESTS)

test-core: install
	$(PY) -m pytest -p no:pytest_qgis -q tests/core

# The QGIS side (real QGIS, pytest-qgis, offscreen) in its own pytest process: torch and QGIS never
# share one. The engine runs in the .venv (SRMF_PYTHON). Screenshots go to tests/artifacts/.
.PHONY: test-qgis package deploy
# SRMF_EXPECT_QGIS makes the suite fail at once when the QGIS it imports is not the one meant.
QGIS_TESTS = SRMF_PYTHON=$(abspath $(PY)) QT_QPA_PLATFORM=offscreen SRMF_EXPECT_QGIS=$(QGIS_VERSION_WANTED) \
  $(PY) -m pytest -q tests/qgis tests/ui

test-qgis: install
	$(QGIS_TESTS)

# The same suite on Debian 12's own QGIS 3.22 (qgisMinimumVersion in metadata.txt), unpacked by qgis-322.
.PHONY: test-qgis-322
QGIS322_TESTS = SRMF_PYTHON=$(abspath $(PY)) QT_QPA_PLATFORM=offscreen SRMF_EXPECT_QGIS=3.22 \
  QGIS_PREFIX_PATH=$(QGIS322)/usr \
  PYTHONPATH=$(CURDIR):$(QGIS322)/usr/lib/python3/dist-packages:$(QGIS322)/usr/share/qgis/python/plugins \
  $(PY) -m pytest -q -p no:cacheprovider tests/qgis tests/ui

test-qgis-322: install qgis-322
	$(QGIS322_TESTS)

# The real QGIS desktop application (the Debian package qgis) on a virtual X display (xvfb-run), with a
# throw-away profile that links this checkout as the plugin: the context menu, the Raster menu, the
# Processing dialog and the task manager driven as an analyst does, the map canvas checked pixel by
# pixel against the model's colours. pytest itself runs without QGIS; screenshots go to
# tests/artifacts/desktop/. About 2-3 minutes on 2 CPU cores.
.PHONY: test-desktop
DESKTOP_TESTS = SRMF_PYTHON=$(abspath $(PY)) $(PY) -m pytest -p no:pytest_qgis -q tests/desktop

test-desktop: install
	$(DESKTOP_TESTS)

# A ZIP for QGIS's "Install from ZIP" (dist/srmf-<version>.zip); DIST=folder to put it elsewhere.
DIST ?= dist
package:
	@test -f $(DEFAULT_MODEL) || $(MAKE) --no-print-directory default-model
	$(PYTHON_SYS) scripts/package.py --output $(DIST)

# Link this folder into a QGIS profile as the plugin "srmf" (QGIS_PROFILE=default); it then runs the
# engine with this folder's .venv. Restart QGIS and enable SRMF in Plugins > Manage and Install Plugins.
QGIS_PROFILE ?= default
QGIS_PLUGINS ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/$(QGIS_PROFILE)/python/plugins
deploy: install
	@mkdir -p "$(QGIS_PLUGINS)"
	@if [ -e "$(QGIS_PLUGINS)/srmf" ] && [ ! -L "$(QGIS_PLUGINS)/srmf" ]; then \
	  echo "$(QGIS_PLUGINS)/srmf exists and is not a link (an installed ZIP?): remove it first"; exit 1; fi
	ln -sfn "$(CURDIR)" "$(QGIS_PLUGINS)/srmf"
	@echo "Linked $(QGIS_PLUGINS)/srmf -> $(CURDIR)"
	@echo "Restart QGIS, then enable SRMF in Plugins > Manage and Install Plugins > Installed."

# Benchmarks (print figures; never timed tests). bench.speed: today's execution against the new one side by
# side (same model, a 4096² VRT of real tiles, one run) and the peak-RSS sweep 2048²/4096²/8192²;
# bench.segment: end-to-end against the raw network per backbone; bench.resolution: native against auto
# processing resolution on the labelled real images; bench.tta: --tta against plain on Dubai tile 3.
# Results in bench-output/.
bench: install
	$(PY) -m bench.speed --out-dir bench-output
	$(PY) -m bench.segment
	$(PY) -m bench.resolution --json bench-output/resolution.json
	$(PY) -m bench.tta --json bench-output/tta.json

# The GPU check (bench/gpu_check.py, ~10 min on one GPU): segment on CUDA against the CPU's fp32 classes
# (passes at >= 99.5 % identical pixels), bench.segment on CUDA, 200 fine-tune iterations on the Dubai
# tiles; figures in gpu-check-output/gpu_check.{json,md}. Exits 2 at once where there is no CUDA GPU.
gpu-check: install
	$(PY) -m bench.gpu_check --out-dir gpu-check-output

clean:
	rm -rf demo-output .pytest_cache

# Fine-tuning recipes on the real Dubai tiles (bench/recipes.py). train-default reproduces the embedded
# model (SRMF, 3000 iterations, tile 3 held out; ~25 min on 2 idle CPU cores); ITERATIONS/MINUTES/DEVICE
# override. The recipe study (leave-one-tile-out cross-validation): python -m bench.cv.
.PHONY: train-default ablation
ITERATIONS ?=
MINUTES ?=
DEVICE ?= auto
train-default: install
	$(PY) -m bench.recipes default --output $(DEFAULT_MODEL) --device $(DEVICE) \
	  $(if $(ITERATIONS),--iterations $(ITERATIONS)) $(if $(MINUTES),--minutes $(MINUTES))

ablation: install
	$(PY) -m bench.recipes ablation --device $(DEVICE) --out-dir ablation-output \
	  $(if $(ITERATIONS),--iterations $(ITERATIONS)) $(if $(MINUTES),--minutes $(MINUTES))

# Cold-start class discovery and the contrastive option on the real Dubai tiles (bench/coldstart.py).
# A full run trains one model per held-out class (11–30 min each on a 2-core CPU; DEVICE=cuda on a GPU);
# eval-coldstart-quick is a 2–5 minute CPU smoke run.
.PHONY: eval-coldstart eval-coldstart-quick
eval-coldstart: install
	$(PY) -m bench.coldstart --device $(DEVICE) --out-dir bench-output/coldstart \
	  $(if $(ITERATIONS),--loco-iterations $(ITERATIONS) --contrastive-iterations $(ITERATIONS))

eval-coldstart-quick: install
	$(PY) -m bench.coldstart --quick --device $(DEVICE) --out-dir bench-output/coldstart-quick

# Self-supervised pretraining, label efficiency (bench/pretrain_eval.py, issue 14): E0 ImageNet, E1 SimCLR, E2
# GraSS at equal steps on the unlabelled Dubai images, the mechanism check, then few-label fine-tunes (1/5/10 %,
# frozen and full, 3 draws) scored on the held-out tile 3. About 90 min on a 2-core CPU at these budgets; a rerun
# continues (pretrain-eval/runs.jsonl); PRETRAIN_ITERATIONS / FT_ITERATIONS / DEVICE override.
.PHONY: eval-pretrain
PRETRAIN_ITERATIONS ?= 240
FT_ITERATIONS ?= 40
eval-pretrain: install
	$(PY) -m bench.pretrain_eval --out pretrain-eval --device $(DEVICE) --iterations $(PRETRAIN_ITERATIONS) \
	  --ft-iterations $(FT_ITERATIONS)
