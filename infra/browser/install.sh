#!/usr/bin/env bash
# Chromium and its WebDriver from Debian: the headless browser the arena's browser test drives through selenium
# (tests/arena/test_arena_browser.py). Playwright's own browser download needs the internet; Debian's package
# comes from the package mirror. Needs root (CI); does nothing when both are installed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
