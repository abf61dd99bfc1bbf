# Sourced by test.sh and the run*.sh recipes: creates .venv when missing, installs the project
# into it (editable, with the dev extra) when pyproject.toml changed, and activates it.
# Idempotent and quick when nothing changed.
if [ ! -x .venv/bin/python ]; then
    echo "setup_env: creating .venv"
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
    echo "setup_env: installing the project into .venv"
    python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    python -m pip install -q -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
