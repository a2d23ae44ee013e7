#!/bin/sh
# Creates .venv beside this file and installs the pinned requirements when they
# changed since the last install.  Usage: . ./bootstrap.sh [requirements file]
# When X.txt has a lock file X.lock (tools/lock.py: every package pinned with its
# hashes), that is what gets installed, with --require-hashes, so this installs exactly
# what was tested; a lock out of date with its input stops here with what to run.
HERE=$(cd "$(dirname "$0")" && pwd)
REQ=${1:-requirements.txt}
VENV="$HERE/.venv"
LOCK="$HERE/${REQ%.txt}.lock"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || exit 1
fi
STAMP="$VENV/.stamp-$(basename "$REQ")"
SUM=$(cat "$HERE"/requirements*.txt "$HERE"/requirements*.lock 2>/dev/null | cksum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SUM" ]; then
    if [ -f "$LOCK" ]; then
        "$VENV/bin/python" "$HERE/tools/lock.py" --check || exit 1
        "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes -r "$LOCK" || exit 1
    else
        "$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/$REQ" || exit 1
    fi
    echo "$SUM" > "$STAMP"
fi
