# The two set-up-and-run commands of the README. Each creates the virtual environment on first use (CPU torch
# pinned, then the project's requirements) and reuses it afterwards; requirements changes trigger a reinstall.
#   make test         the test suite (what CI runs); installs the system packages it needs when missing
#   make quickstart   trains identity into the adapter in the miniature world and shows it (offline, ~2 min)
# For a CUDA machine: make install TORCH="torch==2.13.0" TORCH_INDEX=<index URL from pytorch.org's selector>

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
CHROMIUM ?= /usr/bin/chromium
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICKSTART_OUT ?= quickstart

.PHONY: install test quickstart lint clean-venv system-packages

install: $(STAMP)

# A missing Debian package is installed with apt-get when we are root (or have password-less sudo); otherwise the
# command stops with the line to run. $(call apt_install,PACKAGE,WHY)
define apt_install
if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	echo "installing Debian's $(1) ($(2))"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
	echo "installing Debian's $(1) ($(2))"; \
	sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
else \
	echo "make: $(1) is missing ($(2)) and cannot be installed from here (not root):" >&2; \
	echo "  sudo apt-get install -y $(1)    (or your system's package), then run make again" >&2; \
	exit 1; \
fi
endef

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -c "import ensurepip" 2>/dev/null || { $(call apt_install,python3-venv,python3 -m venv needs it); }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing later pulls a multi-GB CUDA build by accident; no torchvision.
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# ... and held there: a requirement asking for another torch fails here instead of swapping it silently.
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -r requirements-dev.txt --constraint $(VENV)/torch-constraint.txt
	touch $(STAMP)

# What the suite needs beyond the virtual environment: the app's browser test drives Debian's Chromium (no
# browser download is possible).
system-packages:
	@test -x $(CHROMIUM) || { $(call apt_install,chromium,the app's browser test drives it); }

test: install system-packages
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest tests

quickstart: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) quickstart.py --out $(QUICKSTART_OUT)

lint: install
	$(PY) -m ruff format --check . && $(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
