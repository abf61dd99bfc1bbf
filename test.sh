#!/usr/bin/env bash
# The README's test command: set up .venv (if missing), the browser the browser test drives (Debian's chromium,
# when this machine can install it), and run the default (fast) test set.
# Extra arguments go to pytest, e.g. `bash test.sh -m slow` or `bash test.sh tests/test_gpt.py`.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh

# tests/test_browser.py drives a real Chromium through Playwright (Playwright cannot download its own here).
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
        echo "test.sh: installing chromium for the browser test (apt-get)"
        $SUDO apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    else
        echo "test.sh: no /usr/bin/chromium and no way to install it here: the browser test is skipped" \
            "(install Debian's chromium, e.g. 'sudo apt-get install chromium', to run it)"
        export NANOCHAT_SKIP_BROWSER=1
    fi
fi
python -m pytest "$@"
