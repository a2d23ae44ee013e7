"""Helpers shared by several test modules: Monitor and records checks against a running
daemon, the MariaDB of this machine, a TCP proxy that can cut or hang a connection, and a
webhook receiver.
Fixtures built on them live in conftest.py."""
import json
import socket
import threading
import time

import pymysql

import _config
from _tasks import TaskTable

HOST, PORT, USER = '127.0.0.1', 3306, 'root'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Closing:
    def __init__(self, c):
        self.c = c

    def __enter__(self):
        return self.c

    def __exit__(self, *exc):
        self.c.close()


def monitor(daemon, kind='all'):
    with Closing(daemon.client()) as c:
        c.send(1003, {'type': kind})
        ptype, body = c.recv(10)
    assert ptype == 2003
    return body


def assert_records_match(daemon, accepted=None):
    """Every accepted task ended in exactly one record."""
    accepted = monitor(daemon)['counters'].get('accepted', 0) if accepted is None else accepted
    recs = daemon.wait_records(accepted) if accepted else daemon.records()
    ids = [r['data']['speechID'] for r in recs]
    assert len(ids) == accepted, (len(ids), accepted)
    assert len(set(ids)) == len(ids)
    return recs


def server_connection(**kw):
    return pymysql.connect(host=HOST, port=PORT, user=USER, password='', charset='utf8mb4', autocommit=True,
                           connect_timeout=5, read_timeout=30, **kw)


def query(name, sql, args=None):
    with server_connection(database=name, cursorclass=pymysql.cursors.DictCursor) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def rows(name):
    return {r['speech_id']: r for r in query(name, 'SELECT * FROM task ORDER BY id')}


def db_section(name, port=PORT, node='test-node', extra=''):
    return ('[db]\nenabled = true\nip = %s\nport = %d\nuser = %s\npassword = ""\nname = %s\nnode = %s\n%s'
            % (HOST, port, USER, name, node, extra))


class Proxy:
    """Forwards 127.0.0.1:<port> to MariaDB. cut(): every connection closed, new ones refused;
    hang(): connections stay open but nothing goes through; restore(): back to normal."""

    def __init__(self, target=(HOST, PORT)):
        self.target = target
        self.port = free_port()
        self.mode = 'up'
        self.lock = threading.Lock()
        self.socks = set()
        self.listener = None
        self._listen()

    def _listen(self):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(('127.0.0.1', self.port))
        sock.listen(64)
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.socks.add(client)
            if self.mode != 'up':
                continue              # hung: held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            # A relay must not add Nagle's delay (40 ms against the peer's delayed ACK) to small frames.
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.socks.add(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.mode == 'hang':
                    time.sleep(0.02)
                if self.mode != 'up':
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src)
            self._close(dst)

    def _close(self, sock):
        with self.lock:
            self.socks.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def hang(self):
        self.mode = 'hang'

    def cut(self):
        self.mode = 'down'
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)    # wakes the blocked accept(): refused from now on
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        with self.lock:
            socks = list(self.socks)
        for sock in socks:
            self._close(sock)

    def restore(self):
        if self.listener is None:
            self._listen()
        self.mode = 'up'

    def close(self):
        self.cut()


# ---------------------------------------------------------------- a webhook receiver

class Receiver:
    """A threaded http.server on 127.0.0.1 that records every POST and answers as
    `behaviour(request, nth)` says: (status, headers, body, hang_secs). `nth` counts the
    requests seen with the same webhook-id, from 1."""

    def __init__(self, port=0, behaviour=None):
        # Imported here: a bench run as bench/X.py has bench/ first on sys.path, where bench/http.py
        # would shadow the http package for every module that imports this one.
        import http.server
        self.requests = []
        self.lock = threading.Lock()
        self.release = threading.Event()   # ends every hang at once (stop)
        self.behaviour = behaviour or (lambda req, nth: (200, {}, b'ok', 0))
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                req = {'path': self.path, 'headers': {k.lower(): v for k, v in self.headers.items()},
                       'body': body, 'time': time.monotonic()}
                with receiver.lock:
                    nth = 1 + sum(1 for r in receiver.requests
                                  if r['headers'].get('webhook-id') == req['headers'].get('webhook-id'))
                    receiver.requests.append(req)
                status, headers, answer, hang = receiver.behaviour(req, nth)
                if hang:
                    receiver.release.wait(hang)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header('Content-Length', str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass          # the sender gave up waiting: that is the point of a hang

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                pass      # a sender that closed its keep-alive connection: nothing to report

        self.server = Server(('127.0.0.1', port), Handler)
        self.port = self.server.server_port
        self.url = 'http://127.0.0.1:%d/hook' % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def bodies(self):
        with self.lock:
            return [json.loads(r['body']) for r in self.requests]

    def speech_ids(self):
        return {b['speechID'] for b in self.bodies()}

    def by_id(self):
        out = {}
        with self.lock:
            for r in self.requests:
                out.setdefault(r['headers']['webhook-id'], []).append(r)
        return out


# ---------------------------------------------------------------- the task table without a daemon

class FakeConn:
    """Only what the table reads of a client connection: its socket's fd, name and task set."""

    class _Sock:
        def fileno(self):
            return 42

    def __init__(self):
        self.sock = self._Sock()
        self.name = '127.0.0.1:5000'
        self.tasks = set()


class TaskHarness:
    """A TaskTable over a real app.ini in tmp_path, with its callbacks recorded."""

    def __init__(self, tmp_path, max_tasks=3):
        root = tmp_path / 'data'
        root.mkdir(exist_ok=True)
        ini = tmp_path / 'app.ini'
        ini.write_text('[setting]\nmax_tasks = %d\nsession_timeout_secs = 30\n[directory]\nallowed_roots = data, batch\n'
                       '[task]\nmp3_backup = false\n' % max_tasks)
        self.cfg = _config.load(str(ini))
        self.root = str(root)
        self.events, self.answers, self.released = [], [], []
        self.stop, self.up, self.delivered = False, True, True
        self.table = TaskTable(self.cfg, lambda ev, p: self.events.append((ev, p)), lambda: self.stop,
                               lambda: self.up, self.answer, self.released.append)

    def answer(self, task, body):
        self.answers.append(body)
        return self.delivered if task.conn is not None else None

    def req(self, sid=None, name='a.wav', **extra):
        r = {'filePath': self.root, 'fileID': name, 'fileName': name}
        if sid:
            r['speechID'] = sid
        r.update(extra)
        return r
