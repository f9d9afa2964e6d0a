#!/usr/bin/env bash
# Measure the shipped `kbuild` profile (xlio/profiles/kbuild.toml) on this machine:
# a single-threaded build of Linux 6.1's tinyconfig bzImage, profiled by `xlio profile`.
#
#   apt-get install linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
#   bash scripts/profile_kbuild.sh [WORKDIR] [OUT.toml] [JOBS]
#
# JOBS (default 1) > 1 measures a parallel build (kbuild-j); the estimate models
# one vCPU, so such a profile's rates are per CPU second of all of its jobs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/xlio-kbuild}"
out="${2:-$here/xlio/profiles/kbuild.toml}"
jobs="${3:-1}"
src=/usr/src/linux-source-6.1.tar.xz
python="${PYTHON:-$here/.venv/bin/python}"
[ -f "$src" ] || { echo "no $src: apt-get install linux-source-6.1" >&2; exit 2; }
rm -rf "$work"
mkdir -p "$work"
tar -xf "$src" -C "$work"
cd "$work/linux-source-6.1"
# a plain `make tinyconfig` configures a 32-bit kernel: ARCH=x86_64 for both steps
make ARCH=x86_64 tinyconfig >/dev/null
"$python" -m xlio profile -o "$out" -- make ARCH=x86_64 -j"$jobs" bzImage
echo "kbuild profile written to $out" >&2
