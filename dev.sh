#!/usr/bin/env bash
# The two quick-start commands:
#   ./dev.sh serve   create the environment, initialise .kms/ on first run, serve on 127.0.0.1:8400
#   ./dev.sh test    create the environment and run the whole suite (ruff, mypy strict, pytest)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
LOCK=requirements-dev.lock

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "kms-service needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    local stamp=.venv/.kms-lock-stamp
    local want
    want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r "$LOCK"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
        echo "$want" > "$stamp"
    fi
}

# Tools whose pins clash with ours (checkov pins its own boto3) live in a venv of their own.
setup_tools() {
    if [ ! -x .venv-tools/bin/python ]; then
        "$PYTHON" -m venv .venv-tools
    fi
    local stamp=.venv-tools/.kms-lock-stamp
    local want
    want=$(sha256sum requirements-tools.lock | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        .venv-tools/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
            -r requirements-tools.lock
        echo "$want" > "$stamp"
    fi
}

case "${1:-}" in
    serve)
        setup
        .venv/bin/kms init
        echo "admin token file: ${KMS_DATA_DIR:-.kms}/admin-token"
        exec .venv/bin/kms serve
        ;;
    test)
        setup
        setup_tools
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        .venv/bin/mypy
        exec .venv/bin/pytest "${@:2}"
        ;;
    lock)
        # Re-pin every dependency (run after editing pyproject.toml).
        setup
        .venv/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
            --quiet -o "$LOCK"
        .venv/bin/uv pip compile pyproject.toml --extra providers --generate-hashes --python-version 3.11 \
            --quiet -o requirements.lock
        .venv/bin/uv pip compile requirements-tools.in --generate-hashes --python-version 3.11 \
            --quiet -o requirements-tools.lock
        ;;
    *)
        echo "usage: ./dev.sh serve | test [pytest args] | lock" >&2
        exit 2
        ;;
esac
