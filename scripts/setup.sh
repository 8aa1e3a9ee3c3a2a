#!/usr/bin/env bash
# Fresh machine -> ready to run: a .venv with torch==2.13.0 installed first (on the project's
# CPU machines pip resolves it to a local CPU wheel; an unpinned torch, or a package asking for a
# newer one, would pull gigabytes of CUDA), then the requirements under constraints.txt (which
# keeps that torch), mtd itself (editable), and the offline teachers in models/.
# Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.mtd-requirements
want=$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c constraints.txt -r requirements.txt
  python -m pip install -q --no-deps -e .  # `import mtd` from notebooks/ and anywhere else
  echo "$want" > "$stamp"
fi
python scripts/install_teachers.py
