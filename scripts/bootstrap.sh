#!/usr/bin/env bash
# Installs everything `make demo` and `make test` need, idempotently:
#   1. Debian packages (apt as root, sudo otherwise, else a clear message);
#   2. a virtual environment at .venv with the pinned packages of requirements/lock.txt;
#   3. this project, editable, without re-resolving dependencies.
# A stamp keyed on the lock file's and pyproject's hashes skips step 2-3 when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(mosquitto mosquitto-clients swtpm swtpm-tools tpm2-tools libtss2-dev
              softhsm2 espeak-ng libportaudio2 libsndfile1 pkg-config openssl postgresql)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n);
    else
        echo "bootstrap: these Debian packages are missing and I cannot install them without root:" >&2
        echo "    sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a system-wide mosquitto on :1883 when the package installs; devstack
# never uses it (it starts its own on a free loopback port), so leave it alone.

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.stamp-$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
    echo "bootstrap: installing pinned Python packages into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24" 
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements/lock.txt
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    rm -f .venv/.stamp-*
    touch "$stamp"
fi
