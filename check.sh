#!/bin/sh
# Shows whether svcmgr runs: the master and every child with its role and pid.
cd "$(dirname "$0")" || exit 1
./bootstrap.sh requirements.txt || exit 1
exec .venv/bin/python svcmgr.py status "$@"
