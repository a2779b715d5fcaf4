#!/usr/bin/env bash
# Installs what qmoe needs to build and test on Debian 12 (apt + PyPI only). Idempotent and quiet:
# packages already present are skipped, so repeated runs cost seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(build-essential cmake ninja-build pkg-config libgtest-dev libcli11-dev nlohmann-json3-dev
          libprotobuf-dev protobuf-compiler libonnx-dev clang libclang-rt-14-dev)
[ -f scripts/deps-apt.txt ] && mapfile -t -O "${#apt_pkgs[@]}" apt_pkgs < <(grep -v '^#' scripts/deps-apt.txt | sed '/^$/d')
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py_pkgs=(numpy onnx "onnxruntime>=1.30" pytest nanobind scikit-build-core)
if ! python3 -c "import numpy, onnx, onnxruntime, pytest, nanobind, scikit_build_core" 2>/dev/null; then
  echo "setup: installing Python packages ${py_pkgs[*]}"
  python3 -m pip install -q --disable-pip-version-check "${py_pkgs[@]}"
fi
