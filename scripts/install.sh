#!/bin/sh
# Install pqe2ee from this source tree into a fresh venv: the one install step of the Dockerfile,
# run by the test suite too (tests/test_install.py), so the image is built the way it is tested.
#   scripts/install.sh PREFIX [EXTRAS]      e.g. scripts/install.sh /opt/pqe2ee proxy,server,redis
# PYTHON picks the interpreter (default python3); PIP_FLAGS adds pip options.
set -eu
PREFIX=${1:?usage: scripts/install.sh PREFIX [EXTRAS]}
EXTRAS=${2:-proxy,server,redis}
SRC=$(cd "$(dirname "$0")/.." && pwd)
"${PYTHON:-python3}" -m venv "$PREFIX"
# shellcheck disable=SC2086  # PIP_FLAGS is a list of options
"$PREFIX/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q ${PIP_FLAGS:-} \
    "$SRC[$EXTRAS]"
"$PREFIX/bin/pqe2ee" --version
"$PREFIX/bin/pqe2ee" backends
