#!/usr/bin/env bash
# The device check on a GPU machine where this project is not installed and no registry can be
# reached (the `device` tool's machines): wheels carried in .whl/ (bitsandbytes) are installed
# into /tmp/site, the repo is made importable as prolora_serve through a folder of links, then
# `prolora-serve bench device` runs with the arguments given (e.g. --dry-run, --budget-s 450).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$repo"/.whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import prolora_serve.server.cli" >/dev/null 2>&1; then
  shim="$(mktemp -d)"
  mkdir -p "$shim/prolora_serve"  # a namespace package: no __init__.py
  for part in adapters kernels server clients; do ln -s "$repo/$part" "$shim/prolora_serve/$part"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$repo"
export PYTHONUNBUFFERED=1
exec "$python" -m prolora_serve.server.cli bench device "$@"
