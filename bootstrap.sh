#!/bin/sh
# Creates .venv beside this file and installs the pinned requirements when they
# changed since the last install.  Usage: . ./bootstrap.sh [requirements file]
HERE=$(cd "$(dirname "$0")" && pwd)
REQ=${1:-requirements.txt}
VENV="$HERE/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || exit 1
fi
STAMP="$VENV/.stamp-$(basename "$REQ")"
SUM=$(cat "$HERE"/requirements*.txt | cksum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SUM" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/$REQ" || exit 1
    echo "$SUM" > "$STAMP"
fi
