#!/usr/bin/env bash
# Install s2dit-deploy and every tool its tests and targets use, in an order that stays offline-safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.13.0 first: its CPU wheel is available locally; a bare "torch" would pull CUDA builds.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
# open-clip-torch only ships the CLIP BPE vocabulary we tokenize with; --no-deps because its
# dependencies would pull torchvision (no CPU build here). We never import open_clip.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "open-clip-torch==3.3.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[all]"
