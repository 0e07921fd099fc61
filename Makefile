# The two set-up-and-run commands of the README. Each creates the virtual environment on first use (CPU torch
# pinned, then the project's requirements) and reuses it afterwards; requirements changes trigger a reinstall.
#   make test         the test suite (what CI runs)
#   make quickstart   the offline end-to-end job on tiny weights
# For a CUDA machine: make install TORCH="torch==2.13.0" TORCH_INDEX=<index URL from pytorch.org's selector>

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICKSTART_OUT ?= quickstart

.PHONY: install test quickstart lint clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing later pulls a multi-GB CUDA build by accident; no torchvision.
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# ... and held there: a requirement asking for another torch fails here instead of swapping it silently.
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -r requirements-dev.txt --constraint $(VENV)/torch-constraint.txt
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest tests

quickstart: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) quickstart.py --out $(QUICKSTART_OUT)

lint: install
	$(PY) -m ruff format --check . && $(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
