#!/usr/bin/env bash
# Installs zimage's build dependencies from Debian's packages (once) and builds it in ./build.
# Usage: scripts/setup.sh [extra cmake options...]
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake ninja-build pkg-config libopenblas-dev libpng-dev zlib1g-dev libpcre2-dev
      libutf8proc-dev nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev libbenchmark-dev
      libjpeg62-turbo-dev libwebp-dev libcpp-httplib-dev python3-venv chromium)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The server tests' Python clients (tests/server, client side only: the product needs no Python),
# from PyPI into ./venv; redone when tests/server/requirements.txt changes.
if [ "${ZIMAGE_NO_TEST_VENV:-0}" != 1 ]; then
  if ! cmp -s tests/server/requirements.txt venv/.requirements 2>/dev/null; then
    echo "setup: creating venv/ for tests/server"
    python3 -m venv venv
    venv/bin/pip install -q --disable-pip-version-check -r tests/server/requirements.txt
    cp tests/server/requirements.txt venv/.requirements
  fi
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$(nproc)"
echo "setup: built build/zimage"
