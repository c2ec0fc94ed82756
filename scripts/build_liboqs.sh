#!/bin/sh
# Build liboqs for the [liboqs] backend into a local prefix, as ../shared/liboqs/README.md does it:
# ML-KEM-768 only, a shared library, AVX2 code compiled in and picked at run time (OQS_DIST_BUILD).
#
#   scripts/build_liboqs.sh [--if-missing] TARBALL PREFIX
#
# PREFIX/.stamp records the tarball's sha256 and the build flags: a second run with the same
# tarball does nothing. With --if-missing (what `make test`, `make demo` and `make bench` use) it
# also does nothing when the backend already loads without PREFIX (a system liboqs, or the
# user's own OQS_INSTALL_PATH) - asked through the adapter's own probe, which never lets
# liboqs-python download anything - and an existing build is kept when the tarball is gone.
# cmake, ninja and a C compiler come from apt-get when missing (as root). $PYTHON (default
# .venv/bin/python) runs the probe. liboqs-python then finds the library through
# OQS_INSTALL_PATH=PREFIX, which the Makefile sets.
set -eu

usage() {
    echo "usage: $0 [--if-missing] TARBALL PREFIX" >&2
    exit 2
}

if_missing=0
if [ "${1:-}" = "--if-missing" ]; then
    if_missing=1
    shift
fi
[ $# -eq 2 ] || usage
tarball=$1
prefix=$2
python=${PYTHON:-.venv/bin/python}
stamp="$prefix/.stamp"

flags="-DOQS_MINIMAL_BUILD=KEM_ml_kem_768 -DBUILD_SHARED_LIBS=ON -DOQS_BUILD_ONLY_LIB=ON \
-DOQS_DIST_BUILD=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_LIBDIR=lib"

say() {
    echo "liboqs: $*"
}

fail() {
    echo "liboqs: error: $*" >&2
    exit 1
}

stamp_of() {
    echo "$(sha256sum "$1" | cut -d' ' -f1) $flags"
}

# 1. Already built from this tarball (or, for --if-missing, built and the tarball gone)?
if [ -f "$stamp" ]; then
    if [ -f "$tarball" ]; then
        if [ "$(cat "$stamp")" = "$(stamp_of "$tarball")" ]; then
            say "up to date in $prefix"
            exit 0
        fi
        say "$tarball or the build flags changed: rebuilding"
    elif [ "$if_missing" = 1 ]; then
        say "using the build in $prefix ($tarball not found)"
        exit 0
    fi
fi

# 2. --if-missing: a liboqs the backend already loads needs no build.
if [ "$if_missing" = 1 ] && [ ! -f "$stamp" ]; then
    probe='import sys; from pqe2ee.backends import unavailable_reason as r
sys.exit(r("liboqs") is not None)'
    if PYTHONPATH=src "$python" -c "$probe" 2>/dev/null; then
        say "the liboqs backend already loads here (system library or OQS_INSTALL_PATH): no build"
        exit 0
    fi
fi

# 3. Build.
[ -f "$tarball" ] || fail "source tarball $tarball not found.
  Pass it with 'make liboqs SRC=path/to/liboqs-0.16.0.tar.xz', or install liboqs (a system
  package, or your own build with OQS_INSTALL_PATH set to its prefix) and run make again."

# Only a prefix this script made (stamped, or left .partial by a failed build) is ever deleted.
if [ -d "$prefix" ] && [ ! -f "$stamp" ] && [ ! -f "$prefix/.partial" ] &&
    [ -n "$(ls -A "$prefix")" ]; then
    fail "$prefix exists and was not made by $0: remove it or choose another prefix"
fi

missing=""
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
command -v ninja >/dev/null 2>&1 || missing="$missing ninja-build"
command -v cc >/dev/null 2>&1 || missing="$missing gcc"
command -v xz >/dev/null 2>&1 || missing="$missing xz-utils"
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        fail "missing build tools:$missing (install them; as root on Debian this script does)"
    fi
    say "installing$missing"
    apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/liboqs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
say "building $(basename "$tarball") into $prefix"
started=$(date +%s)
tar -xJf "$tarball" -C "$work"
source_dir=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -f "$source_dir/CMakeLists.txt" ] || fail "$tarball does not hold a liboqs source tree"
rm -rf "$prefix"
mkdir -p "$prefix"
touch "$prefix/.partial"
# shellcheck disable=SC2086 # $flags is a list of arguments
if ! cmake -S "$source_dir" -B "$work/build" -GNinja $flags \
    -DCMAKE_INSTALL_PREFIX="$prefix" >"$work/build.log" 2>&1 ||
    ! ninja -C "$work/build" install >>"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    fail "the build failed (last lines above)"
fi
stamp_of "$tarball" >"$stamp"
rm -f "$prefix/.partial"
say "built in $(($(date +%s) - started)) s: OQS_INSTALL_PATH=$prefix"
