#!/usr/bin/env bash
# System packages the test suite needs beyond PyPI: libfuse.so.2 (Debian's
# libfuse2, libfuse2t64 from trixie on) for the power-loss file system in
# tests/faults (fusepy loads it with ctypes). Idempotent; a no-op when the
# library is already there. Where it cannot install (no apt-get, not root and
# no password-less sudo) it says so and exits 0: those tests then skip with
# the reason.
set -euo pipefail

if ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 '; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: no apt-get; install libfuse2 (libfuse.so.2) by hand for the power-loss tests" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "deps.sh: not root and no password-less sudo; the power-loss tests will skip" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
for pkg in libfuse2t64 libfuse2; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then
        $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
        exit 0
    fi
done
echo "deps.sh: neither libfuse2t64 nor libfuse2 is known to apt; the power-loss tests will skip" >&2
