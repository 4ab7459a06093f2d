#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv, the pinned packages, and the demo assets.
# Safe to run again: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing requirements"
  # torch first and alone, so that nothing else can pull a different (CUDA) build in.
  .venv/bin/python -m pip install --disable-pip-version-check -q "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
  echo "$want" > "$stamp"
fi

if [ ! -f demo/.complete ]; then
  echo "setup: building the demo model and image set in demo/"
  .venv/bin/python -m backend demo-assets demo
fi
echo "setup: done"
