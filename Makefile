# actcomp: `make reproduce` (the main job), `make verify` (does it reproduce here?) and `make test`; each installs into .venv first when needed.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-stamp
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test lint reproduce verify figures data clean-results gpu-check study

install: $(STAMP)

# pip -qq: errors only. With -q pip prints a warning per index location that lacks a package (dozens on machines
# with extra local indexes) and the build backend's notes; an install error still prints in full.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev]'
	touch $(STAMP)

# Real offline data (Fashion-MNIST, Debian package); harmless when already there or when apt is unavailable.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then echo "fashion-mnist: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	  && echo "fashion-mnist: installed" || echo "fashion-mnist: apt install failed (see README: Data)"; \
	else echo "fashion-mnist: not installed and apt unavailable (see README: Data)"; fi

# Two pytest-xdist workers (one torch thread each, tests/conftest.py): the suite's target is 2 cores.
# `make test TEST_WORKERS=0` runs in one process; `TEST_WORKERS=auto` uses every core.
TEST_WORKERS ?= 2
test: install data
	WANDB_MODE=disabled $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

lint: install
	.venv/bin/ruff check .

reproduce: install data
	$(PY) -m benchmarks.reproduce $(if $(QUICK),quick=true,out=results)

# Re-run the study into scratch/verify-<time>/ and compare it with results/ number by number (exit 1 if not
# reproduced). QUICK=1: toy scale against results/quick/; STAGES=table,timeline: some stages only.
verify: install data
	$(PY) -m benchmarks.reproduce verify=true $(if $(QUICK),quick=true,) $(if $(STAGES),stages=$(STAGES),)

# The memory-accuracy frontier (figure 10, results/train/frontier/): presets x seeds, two model families
# (~3 h on 2 idle cores; QUICK=1: toy scale into results-quick/). Re-running continues interrupted runs.
study: install data
	$(PY) -m benchmarks.reproduce study=true $(if $(QUICK),quick=true,out=results) stages=frontier_resnet18,frontier_mobile,figures

figures: install
	$(PY) -m benchmarks.figures

# On a CUDA machine: measured GPU memory, step-time ratios (eager and compiled), one largest-batch check per model.
gpu-check: install
	$(PY) -m benchmarks.gpu_check $(ARGS)
