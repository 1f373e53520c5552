#!/usr/bin/env bash
# Creates .venv (Python 3.11) with torch, torchvision, detectron2 and this package.
# Idempotent: a stamp file records the inputs; when they have not changed it returns at once.
#
# detectron2 is not on PyPI. Here we install the `sal-detectron2==0.7.2` wheel (a repackaging of
# detectron2's main branch; only a cp310 wheel exists, its Python code runs on 3.11 and its compiled
# _C is not needed for semantic segmentation). Users with internet can instead set
#   D2_SOURCE="git+https://github.com/facebookresearch/detectron2.git"
# to build detectron2 from its repository (needs a compiler and torch already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
D2_SOURCE=${D2_SOURCE:-wheel}
stamp="$VENV/.semiseg_d2_stamp"
want="$(cat tools/setup_env.sh setup.py requirements.txt requirements-test.txt | sha1sum | cut -c1-16)-$TORCH_VERSION-$TORCHVISION_VERSION-$D2_SOURCE"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "setup_env.sh: $PYTHON not found (Python 3.11 is required)"; exit 1; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
if [[ "$D2_SOURCE" == "wheel" ]]; then
  whl_dir=.cache/wheels
  whl="$whl_dir/sal_detectron2-0.7.2-py3-none-any.whl"
  if [[ ! -f "$whl" ]]; then
    mkdir -p "$whl_dir"
    tmp=$(mktemp -d)
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.10 --platform linux_x86_64 -d "$tmp" sal-detectron2==0.7.2
    mv "$tmp"/sal_detectron2-0.7.2-*.whl "$whl"
    rm -rf "$tmp"
  fi
  "${pip[@]}" "$whl" -r requirements.txt
else
  "${pip[@]}" -r requirements.txt
  "${pip[@]}" --no-build-isolation "$D2_SOURCE"
fi
"${pip[@]}" --no-deps -r requirements-test.txt
"${pip[@]}" --no-deps -e .
echo "$want" > "$stamp"
