#!/bin/sh
# Stops the svcmgr daemon gracefully and waits until its processes are gone.
cd "$(dirname "$0")" || exit 1
./bootstrap.sh requirements.txt || exit 1
exec .venv/bin/python svcmgr.py stop "$@"
