#!/usr/bin/env bash
# CI: Debian's headless-capable Chromium for the report test (tests/test_figures.py), installed only if missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
