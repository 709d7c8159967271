# im2hands — set-up, demo and tests on a fresh Debian machine with Python 3.11.
#
#   make demo    set everything up, then run the ROS 2 node on the synthetic camera's frames
#                (camera, node and a recorder as separate processes; report, meshes, overlays)
#   make demo-data  a small synthetic dataset + contact sheet, reconstructed with the shipped
#                weights, and the pipeline on camera frames (the library without ROS)
#   make test    set everything up, then run the full test suite (what CI runs: .ci/run)
#
# `make setup` is idempotent: each step leaves a stamp in $(STAMPS) and is redone only when the
# stamp is missing (or, for the pip step, when setup.py / setup.cfg / pyproject.toml changed).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMPS := .make-stamps
TORCH_VERSION := 2.13.0
# Extra pip arguments for the torch install only (e.g. an index that serves CPU wheels).
TORCH_PIP_ARGS ?=
# System packages for headless OpenGL through EGL (Mesa's llvmpipe renders on the CPU), and the
# photographs the realistic renders use as backgrounds (mate-backgrounds: GPL-2+ nature photos).
APT_PACKAGES := libegl1 libgl1 libgl1-mesa-dri libegl-mesa0 mate-backgrounds

DEMO_N ?= 24
DEMO_SEED ?= 0
DEMO_WORKERS ?= 2
DEMO_OUT ?= out/demo_data
DEMO_SECONDS ?= 20
PYTEST_ARGS ?=
TEST_ROS_DOMAIN_ID ?=

# A removed or broken .venv invalidates every step that installed into it.
ifeq ($(wildcard $(VPY)),)
$(shell rm -f $(STAMPS)/venv $(STAMPS)/torch $(STAMPS)/deps $(STAMPS)/models)
endif

.PHONY: help setup demo demo-data test lint clean distclean

help:
	@echo "make demo       set up, then run the ROS 2 node on synthetic camera frames (out/demo_report.json)"
	@echo "make demo-data  set up, then generate $(DEMO_N) synthetic scenes in $(DEMO_OUT) and reconstruct them"
	@echo "make test       set up, then run the full test suite (CI runs this)"
	@echo "make setup      system EGL/Mesa packages, $(VENV) with torch==$(TORCH_VERSION), pip install -e '.[dev]', MediaPipe hand models"
	@echo "make lint       ruff check"
	@echo "make clean      remove outputs and caches (keeps $(VENV)); make distclean also removes $(VENV)"

setup: $(STAMPS)/system $(STAMPS)/deps $(STAMPS)/models

$(STAMPS):
	@mkdir -p $@

# --- 1. system packages for headless EGL rendering -------------------------------------------
$(STAMPS)/system: | $(STAMPS)
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "warning: no dpkg here; install EGL + Mesa (llvmpipe) yourself: $(APT_PACKAGES)" >&2; \
	else \
	  missing=""; \
	  for p in $(APT_PACKAGES); do \
	    dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	    echo "installing system packages:$$missing"; \
	    $$sudo apt-get update && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y --no-install-recommends $$missing; \
	  else \
	    echo "system packages present: $(APT_PACKAGES)"; \
	  fi; \
	fi
	@touch $@

# --- 2. virtual environment with Python 3.11 -------------------------------------------------
$(STAMPS)/venv: | $(STAMPS)/system
	@is311='import sys; sys.exit(sys.version_info[:2] != (3, 11))'; \
	if [ -x "$(VPY)" ] && "$(VPY)" -c "$$is311" 2>/dev/null; then \
	  echo "reusing $(VENV)"; \
	else \
	  py=""; \
	  for c in $(PYTHON) python3; do \
	    if command -v "$$c" >/dev/null 2>&1 && "$$c" -c "$$is311" 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	  if [ -z "$$py" ]; then \
	    echo "error: Python 3.11 is needed (tried $(PYTHON), python3); e.g. apt-get install python3.11 python3.11-venv" >&2; \
	    exit 1; \
	  fi; \
	  if ! "$$py" -c 'import ensurepip, venv' 2>/dev/null && command -v apt-get >/dev/null 2>&1; then \
	    sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	    echo "installing python3.11-venv"; \
	    $$sudo apt-get update && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y --no-install-recommends python3.11-venv; \
	  fi; \
	  rm -rf "$(VENV)"; \
	  echo "creating $(VENV) with $$(command -v $$py) ($$($$py --version))"; \
	  "$$py" -m venv "$(VENV)"; \
	fi
	@touch $@

# --- 3. torch first, so that nothing later resolves to a CUDA build ---------------------------
$(STAMPS)/torch: $(STAMPS)/venv
	$(VPY) -m pip install $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	@printf 'torch==%s\n' "$(TORCH_VERSION)" > $(STAMPS)/constraints.txt
	@touch $@

# --- 4. the project (editable) with its test tools; torch stays pinned ------------------------
$(STAMPS)/deps: $(STAMPS)/torch setup.py setup.cfg pyproject.toml
	$(VPY) -m pip install -c $(STAMPS)/constraints.txt -e '.[dev]'
	@$(VPY) -c "import torch; v = torch.__version__; \
	  assert v.split('+')[0] == '$(TORCH_VERSION)', f'torch {v} installed, expected $(TORCH_VERSION)'; \
	  print('torch', v)"
	@touch $@

# --- 5. MediaPipe's hand models (Apache-2.0), the default keypoint source --------------------
# Taken out of the mediapipe==0.10.21 wheel (downloaded from PyPI, never installed: it pins
# protobuf<5) and checked against their SHA-256 sums; nothing is downloaded at run time.
$(STAMPS)/models: $(STAMPS)/deps
	$(VENV)/bin/im2hands fetch-models
	@touch $@

# --- the two README commands ------------------------------------------------------------------
# The main job: the ROS 2 node on the synthetic camera's frames, as separate processes on this
# machine only (own ROS domain, localhost discovery), measured end to end.
demo: setup
	$(VENV)/bin/im2hands-ros-demo --out out --duration $(DEMO_SECONDS)
	@echo
	@echo "report:   out/demo_report.json"
	@echo "pictures: out/ros_demo/overview.png (overlays of received meshes), out/ros_demo/overlay*.png"
	@echo "meshes:   out/ros_demo/frame*_{left,right}.ply; logs: out/ros_demo/{node,camera}.log"

# The library on its own: a synthetic dataset with its contact sheet, the shipped weights on four
# of its scenes (accuracy table), and the pipeline on rendered camera frames.
demo-data: setup
	rm -rf "$(DEMO_OUT)"
	$(VENV)/bin/im2hands-data synth --n $(DEMO_N) --seed $(DEMO_SEED) --out "$(DEMO_OUT)" \
	  --workers $(DEMO_WORKERS)
	OMP_NUM_THREADS=1 $(VPY) training/evaluate.py --pretrained --data "$(DEMO_OUT)" --scenes 4 \
	  --resolution 32 --upsampling-steps 1 --n-iou 20000 --n-chamfer 20000 --jobs 2 --quiet \
	  --pictures 4 --picture-variants "HALO,I,I+R" --out "$(DEMO_OUT)/reconstruction"
	OMP_NUM_THREADS=2 $(VENV)/bin/im2hands demo -o "$(DEMO_OUT)/pipeline" --device cpu
	@echo
	@echo "contact sheet:  $(DEMO_OUT)/contact_sheet.png"
	@echo "report:         $(DEMO_OUT)/report.json"
	@echo "reconstruction: $(DEMO_OUT)/reconstruction/comparison.png (shipped weights, GT keypoints)"
	@echo "                $(DEMO_OUT)/reconstruction/results.md"
	@echo "pipeline:       $(DEMO_OUT)/pipeline/overview.png (camera frames -> meshes, keypoints,"
	@echo "                contacts; PLY/JSON/overlay per frame in $(DEMO_OUT)/pipeline/frame*/)"

# Each run gets its own ROS domain (1..90, within Fast DDS's valid 0..101 on Linux) and keeps
# DDS discovery on this machine. Override the domain with `make test TEST_ROS_DOMAIN_ID=N`.
test: setup
	ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST \
	ROS_DOMAIN_ID=$(if $(TEST_ROS_DOMAIN_ID),$(TEST_ROS_DOMAIN_ID),$$(( $$$$ % 90 + 1 ))) \
	  $(VPY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf out build install log .pytest_cache .ruff_cache *.egg-info $(STAMPS)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
