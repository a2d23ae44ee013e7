#!/bin/sh
# Starts the svcmgr daemon with app.ini beside this file (creates .venv on first use).
cd "$(dirname "$0")" || exit 1
./bootstrap.sh requirements.txt || exit 1
exec .venv/bin/python svcmgr.py start "$@"
