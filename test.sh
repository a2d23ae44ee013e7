#!/bin/sh
# Runs the whole test suite: installs what the tests need (.venv with the pinned
# test requirements, a running MariaDB and RabbitMQ), then pytest. Extra arguments go to pytest.
cd "$(dirname "$0")" || exit 1
./bootstrap.sh requirements-test.txt || exit 1
if ! .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 3306), 2)" 2>/dev/null; then
    if [ -x /usr/sbin/mariadbd ]; then
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    fi
fi
# Cluster tests (tests/cluster.py) need the machine's RabbitMQ; HAProxy is installed by conftest.py.
if ! .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 5672), 2)" 2>/dev/null; then
    if [ -x /usr/sbin/rabbitmq-server ]; then
        /usr/sbin/rabbitmq-server -detached
        for _ in $(seq 60); do
            .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 5672), 2)" 2>/dev/null && break
            sleep 1
        done
    fi
fi
# tests/callsets.py speaks its call sets with flite and espeak-ng (Debian's packages).
if [ ! -x /usr/bin/flite ] || [ ! -x /usr/bin/espeak-ng ]; then
    apt-get update -q && apt-get install -y -q flite espeak-ng || exit 1
fi
.venv/bin/python -m pytest "$@"
code=$?
if [ "$code" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit $code
