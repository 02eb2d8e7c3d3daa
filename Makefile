# Everything a fresh machine needs: `make test` and `make demo` install what they use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.agmae-installed
# Debian's package, or any folder with Fashion-MNIST's four IDX files named by AGMAE_FASHION_MNIST
FASHION_MNIST := $(or $(AGMAE_FASHION_MNIST),/usr/share/datasets/fashion-mnist)
export HF_HUB_OFFLINE := 1

.PHONY: install test demo bench clean-venv

install: $(INSTALLED) $(FASHION_MNIST)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# torch/torchvision are pinned here (not in setup.cfg, which keeps ranges) because these
# two releases are the ones that import together on this machine and install from local disk.
$(INSTALLED): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -q dataset-fashion-mnist || \
	{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }

test: install
	$(PY) -m pytest -q tests

# DEMO_ARGS passes options through, e.g. make demo DEMO_ARGS='--epochs 20'
DEMO_ARGS ?=

demo: install
	$(PY) -m experiments.demo $(DEMO_ARGS)

bench: install
	for b in benchmarks/*_bench.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
