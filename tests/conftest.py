"""Shared test harness: a real svcmgr daemon on a free port in a temporary folder,
a blocking protocol client, and waiting on conditions with deadlines."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pymysql
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
sys.path.insert(0, ROOT)

from _children import title_of  # noqa: E402
from _packet import FrameDecoder, encode  # noqa: E402
from helpers import HOST, PORT, USER, free_port, server_connection  # noqa: E402,F401 (free_port: for test modules)


def wait_for(predicate, timeout=30.0, what='condition', interval=0.05):
    """Poll `predicate` until it returns a true value; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %.1f s waiting for %s' % (timeout, what))
        time.sleep(interval)


def expected_texts():
    with open(os.path.join(FIXTURES, 'fixtures.json'), encoding='utf-8') as f:
        return json.load(f)


class Client:
    """A blocking protocol client that reads whole frames by their length."""

    def __init__(self, port, host='127.0.0.1', timeout=60):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.timeout = timeout
        self.decoder = FrameDecoder(64 << 20)
        self.frames = []

    def send(self, ptype, body):
        self.sock.sendall(encode(ptype, body))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError('no frame within %s s' % (timeout or self.timeout))
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError('connection closed by the daemon')
            self.frames.extend(self.decoder.feed(data))
        ptype, body = self.frames.pop(0)
        try:
            return ptype, json.loads(body.decode('utf-8'))
        except ValueError:
            return ptype, body.decode('utf-8')

    def recv_n(self, n, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        return [self.recv(max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def closed_by_peer(self, timeout=10):
        """True when the daemon closes the connection within `timeout` (no frame expected)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return True
                self.frames.extend(self.decoder.feed(data))
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


INI_TEMPLATE = """
[setting]
mode = TEST
log_level = debug
log_path = logs
worker_processes = {workers}
max_tasks = {max_tasks}
session_timeout_secs = {timeout}
graceful_timeout_secs = {graceful}
monitor_interval_secs = 0.5
heartbeat_secs = 0.5
[task]
mp3_backup = {mp3}
error_backup_path = error
keep_wav = true
source_after = {source_after}
[directory]
audio_source_path = batch
audio_target_path = batch/rec_mp3
scan_interval_secs = 1
scan_enabled = false
allowed_roots = {roots}
[server]
ip = 127.0.0.1
port = {port}
max_connections = {max_connections}
[engine]
type = {engine}
model = {model}
engine_slots = {engine_slots}
engine_concurrency = {engine_concurrency}
"""


def records_in(paths):
    """The records of these records files as far as they are written: a last line without its
    newline is one the reporter is still writing (a reader can see part of a write), not a torn
    record."""
    out = []
    for path in paths:
        with open(path, encoding='utf-8') as f:
            out.extend(json.loads(line) for line in f if line.endswith('\n') and line.strip())
    return out


class Daemon:
    """A real svcmgr daemon in its own folder, started and stopped with svcmgr.py."""

    def __init__(self, base, root=ROOT, **opts):
        self.root = root              # the source tree whose svcmgr.py runs (bench/core.py compares two)
        self.base = str(base)
        self.port = free_port()
        self.opts = dict(workers=2, max_tasks=100, timeout=60, graceful=10, mp3='false',
                         source_after='keep', max_connections=1024, roots='batch, data', port=self.port,
                         engine='pocketsphinx', model='', engine_slots=1, engine_concurrency=1,
                         http='false', http_port=free_port(), http_extra='')
        self.opts.update(opts)
        self.http_port = self.opts['http_port']
        self.ini = os.path.join(self.base, 'app.ini')
        self.batch = os.path.join(self.base, 'batch')
        self.data = os.path.join(self.base, 'data')
        os.makedirs(self.data, exist_ok=True)
        self.write_ini()

    def write_ini(self, extra=''):
        with open(self.ini, 'w') as f:
            f.write(INI_TEMPLATE.format(**self.opts) + self.http_section() + extra)

    def http_section(self):
        # Off unless a test turns it on (the web process is one more child to count); a source
        # tree from before the web process (bench/core.py --baseline) knows no [http].
        if not os.path.exists(os.path.join(self.root, '_web_end.py')):
            return ''
        return ('[http]\nenabled = {http}\nip = 127.0.0.1\nport = {http_port}\nupload_path = data/uploads\n'
                '{http_extra}\n').format(**self.opts)

    def cli(self, *args, timeout=120, check=False):
        proc = subprocess.run([sys.executable, os.path.join(self.root, 'svcmgr.py'), '-c', self.ini] + list(args),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError('svcmgr %s failed (%d): %s %s' % (args, proc.returncode, proc.stdout, proc.stderr))
        return proc

    def start(self):
        self.cli('start', check=True)
        return self

    @property
    def pid(self):
        try:
            with open(os.path.join(self.base, 'svcmgr.pid')) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def processes(self):
        """The master and all its descendants."""
        pid = self.pid
        if pid is None:
            return []
        try:
            master = psutil.Process(pid)
            return [master] + master.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self):
        out = []
        for p in self.processes()[1:]:
            try:
                if title_of(p).startswith('svcmgr: worker'):
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self):
        procs = self.processes()
        if not procs:
            return
        self.cli('stop', timeout=180)
        gone, alive = psutil.wait_procs(procs, timeout=30)
        for p in alive:
            p.kill()
        assert not alive, 'processes left after stop: %s' % alive

    def client(self, **kw):
        return Client(self.port, **kw)

    def records(self):
        return records_in(sorted(glob.glob(os.path.join(self.base, 'records', '*.json'))))

    def wait_records(self, n, timeout=60):
        return wait_for(lambda: len(self.records()) >= n and self.records(), timeout, '%d records' % n)

    def log_text(self):
        path = os.path.join(self.base, 'logs', 'app.log')
        try:
            with open(path, encoding='utf-8', errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def psout(self):
        try:
            with open(os.path.join(self.base, 'psout.log'), encoding='utf-8', errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def fixture(self, name, dest=None, folder=None):
        """Copy a fixture into the daemon's data folder; returns (folder, file name)."""
        folder = folder or self.data
        os.makedirs(folder, exist_ok=True)
        dest = dest or name
        shutil.copy(os.path.join(FIXTURES, name), os.path.join(folder, dest))
        return folder, dest


def transcribe_req(folder, name, sid=None, **extra):
    req = {'filePath': folder, 'fileID': name, 'fileName': name, 'domainName': 'SGDefault', 'domainCode': 'SG0001'}
    if sid:
        req['speechID'] = sid
    req.update(extra)
    return req


@pytest.fixture
def make_daemon(tmp_path):
    made = []

    def make(**opts):
        # SVCMGR_TEST_DAEMON_ROOT: run the daemon of another source tree (an old checkout, to
        # show that a test fails there).
        opts.setdefault('root', os.environ.get('SVCMGR_TEST_DAEMON_ROOT') or ROOT)
        d = Daemon(tmp_path / ('d%d' % len(made)), **opts)
        made.append(d)
        return d
    yield make
    for d in made:
        try:
            d.stop()
        finally:
            for p in d.processes():
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture
def daemon(make_daemon):
    return make_daemon().start()


def long_wav(path, seconds):
    """A WAV of real speech about `seconds` long: the fixture phrases one after another."""
    import wave
    frames, params = [], None
    names = sorted(n for n in os.listdir(FIXTURES) if n.startswith('en_') and n.endswith('.wav'))
    total = 0
    while total < seconds * 8000:
        for name in names:
            with wave.open(os.path.join(FIXTURES, name)) as w:
                params = w.getparams()
                data = w.readframes(w.getnframes())
            frames.append(data)
            total += len(data) // 2
            if total >= seconds * 8000:
                break
    with wave.open(str(path), 'wb') as out:
        out.setparams(params)
        out.writeframes(b''.join(frames))
    return str(path)


@pytest.fixture(scope='module')
def fuzz_daemon(tmp_path_factory):
    """One daemon for a whole module of fuzzing (starting one per example would dominate)."""
    d = Daemon(tmp_path_factory.mktemp('fuzz'), workers=1, timeout=5).start()
    yield d
    d.stop()


# ---------------------------------------------------------------- MariaDB

@pytest.fixture(scope='session')
def mariadb():
    try:
        conn = server_connection()
    except pymysql.err.MySQLError as exc:
        pytest.fail('MariaDB is not reachable at %s:%s as %s (%s). These tests need it: start it with '
                    '"start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd" '
                    'or run ./test.sh, which does.' % (HOST, PORT, USER, exc), pytrace=False)
    conn.close()


@pytest.fixture
def dbname(mariadb):
    """A database of its own for this test (created by the test or by `db init`), dropped at the end."""
    name = 'svcmgr_t_%s' % uuid.uuid4().hex[:12]
    yield name
    with server_connection() as conn, conn.cursor() as cur:
        cur.execute('DROP DATABASE IF EXISTS `%s`' % name)


# ---------------------------------------------------------------- Debian packages some tests drive

_APT_UPDATED = []


def debian_program(program, package):
    """The path of `program`, installing Debian's `package` first when it is missing
    (`apt-get update` once per test session). The test set-up installs what it needs, so a
    fresh machine runs these tests too."""
    path = shutil.which(program)
    if path:
        return path
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    if not _APT_UPDATED:
        subprocess.run(['apt-get', 'update'], check=True, env=env, capture_output=True, timeout=600)
        _APT_UPDATED.append(True)
    proc = subprocess.run(['apt-get', 'install', '-y', package], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail('cannot install Debian package %s: %s' % (package, proc.stderr[-2000:]), pytrace=False)
    path = shutil.which(program)
    if not path:
        pytest.fail('Debian package %s installed no %s' % (package, program), pytrace=False)
    return path


@pytest.fixture(scope='session')
def chromium_path():
    return debian_program('chromium', 'chromium')


@pytest.fixture(scope='session')
def prometheus_path():
    return debian_program('prometheus', 'prometheus')


@pytest.fixture(scope='session')
def haproxy_path():
    # /usr/sbin may be missing from a non-root PATH: ask for the package's path itself.
    return debian_program('/usr/sbin/haproxy', 'haproxy')


@pytest.fixture
def make_cluster(tmp_path, haproxy_path, dbname):
    """make_cluster(n=3, cluster_mode=..., ...): a started tests/cluster.Cluster in its own
    folder, database and queue; stopped, its queues deleted and its database dropped after."""
    from cluster import Cluster
    made = []

    def make(**kw):
        c = Cluster(tmp_path / ('cluster%d' % len(made)), haproxy_path, dbname, **kw)
        made.append(c)
        return c.start()
    yield make
    for c in made:
        c.close()
