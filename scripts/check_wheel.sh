#!/usr/bin/env bash
# Build a wheel from the repository, install it into a fresh virtual environment beside the registry's
# `guidance` package (an LLM prompting library, which a bare top-level `guidance` of ours would break), and
# generate an image from the shipped model there, outside the source tree. Prints each step's result.
# Usage: bash scripts/check_wheel.sh [WORKDIR]   (downloads torch and the rest from the registry: minutes)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python3 -m pip wheel -q --no-deps -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/diffsteer-*.whl)"
echo "wheel: $wheel"
python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names if not n.startswith("diffsteer-")})
print("top-level entries:", tops)
assert tops == ["diffsteer"], tops
assert any(n.startswith("diffsteer/proving_ground/assets/model/unet/") for n in names), "shipped model missing"
PY
rm -rf "$work/venv"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel" guidance
cd "$work"  # nothing of the source tree is importable from here
"$work/venv/bin/python" - <<'PY'
import guidance, diffsteer.guidance.sampler, diffsteer.proving_ground.shipped as shipped
print("registry guidance:", guidance.__file__)
print("diffsteer.guidance:", diffsteer.guidance.sampler.__file__)
assert "site-packages" in diffsteer.guidance.sampler.__file__ and shipped.MODEL.is_dir()
PY
HF_HUB_OFFLINE=1 "$work/venv/bin/diffsteer" generate "a red circle" --seed 1 -q -o "$work/red.png"
"$work/venv/bin/python" -c "from PIL import Image; im = Image.open('$work/red.png'); print('generated:', im.size, im.mode)"
echo "wheel check passed in $work"
