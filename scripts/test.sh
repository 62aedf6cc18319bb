#!/usr/bin/env bash
# The project's test command (README "Run the tests"): install with the dev extra, then run pytest offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[dev]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pytest -q "$@"
