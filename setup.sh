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

# The demo is rebuilt when missing or older than this checkout's (backend/trainer/demo.py DEMO_VERSION).
demo_want=$(sed -n 's/^DEMO_VERSION = \([0-9]*\).*/\1/p' backend/trainer/demo.py)
demo_have=$(sed -n 's/.*"version": *\([0-9]*\).*/\1/p' demo/.complete 2>/dev/null || true)
if [ ! -f demo/.complete ] || [ "$demo_have" != "$demo_want" ]; then
  echo "setup: building the demo model and image set in demo/"
  .venv/bin/python -m backend demo-assets demo
fi
# Lathe's own bytecode, written once: every run starts a CLI and a trainer process, and where
# PYTHONDONTWRITEBYTECODE is set, Python would otherwise compile these modules from source in each.
# (A changed source file is recompiled in memory; its stale .pyc is never used.)
.venv/bin/python -m compileall -q -j 0 app.py backend gui >/dev/null
echo "setup: done"
