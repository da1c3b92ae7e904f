#!/usr/bin/env bash
# Installs what catalog-index needs on a fresh Debian/Ubuntu machine:
#   Debian packages: a Java runtime (Spark), openclipart-png (the sample catalog), chromium (the search
#   page's browser test: playwright drives the system browser, no browser download)
#   .venv at the repo root from requirements.txt, and the project itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(default-jre-headless openclipart-png chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! command -v java >/dev/null 2>&1 && [[ ! " ${missing[*]} " =~ " default-jre-headless " ]]; then
  missing+=(default-jre-headless)
fi
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
[[ -n "$PYTHON" ]] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
echo "setup: installing requirements.txt into .venv (first time: several minutes, torch is large)"
.venv/bin/pip install -q -r requirements.txt
# petastorm pins setuptools<70, which torch 2.14 cannot live with; its real deps are in requirements.txt.
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/pip install -q --no-deps -e .
echo "setup: done (.venv/bin/catalog-index)"
