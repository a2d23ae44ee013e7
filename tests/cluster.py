"""Multi-node harness for the cluster tests and bench/cluster.py: N real svcmgr daemons (own
base dirs and ports, one shared drop folder and shared_path, one MariaDB database, one broker
queue), Debian's HAProxy in front of their packet and HTTP ports, a TCP link to RabbitMQ that
can be cut for S seconds, SIGKILL and restart of a node, and counting of what every task left:
records across all nodes, final database rows, webhook ids at a real HTTP receiver.

Nodes run with [cluster] enabled = false too (islands behind one address), which is how
the harness itself is tested and how the bench measures single-node mode."""
import collections
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import psutil
import pymysql

from conftest import FIXTURES, INI_TEMPLATE, Client, Daemon, records_in, transcribe_req, wait_for
from helpers import Proxy, Receiver, db_section, free_port, monitor, query, server_connection
from legacy_engine import LegacyEngine

BROKER = ('127.0.0.1', 5672)
BROKER_USER = ('guest', 'guest')


def ini_set(text, section, key, value):
    """`text` (an app.ini) with `key = value` in [section]: the key's line replaced when the
    section has it, else added under the section's header (the section added when missing)."""
    lines = text.split('\n')
    header = '[%s]' % section
    if header not in (line.strip() for line in lines):
        return text.rstrip('\n') + '\n%s\n%s = %s\n' % (header, key, value)
    current = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith('['):
            current = stripped
        elif current == header and stripped.split('=', 1)[0].strip() == key and '=' in stripped:
            lines[i] = '%s = %s' % (key, value)
            return '\n'.join(lines)
    i = [line.strip() for line in lines].index(header)
    lines.insert(i + 1, '%s = %s' % (key, value))
    return '\n'.join(lines)


def frame_1003(kind='memory'):
    """A Monitor request as raw bytes: what HAProxy's health check sends to a packet port."""
    body = json.dumps({'type': kind}).encode()
    return b'1003' + (b'%8d' % len(body)) + body


def sigkill(daemon, timeout=30):
    """The node's machine dies: its master and every child SIGKILLed at once."""
    procs = daemon.processes()
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


class Node(Daemon):
    """One cluster node: a Daemon whose app.ini points at the shared folders, the cluster's
    database, the broker link and the webhook receiver."""

    def __init__(self, cluster, index, **opts):
        self.cluster = cluster
        self.index = index
        self.name = 'node%d' % index
        self.engines = []
        super().__init__(os.path.join(cluster.base, self.name), **opts)

    def write_ini(self, extra=''):
        c = self.cluster
        text = INI_TEMPLATE.format(**self.opts) + self.http_section()
        for section, key, value in (
                ('directory', 'audio_source_path', c.drop),
                ('directory', 'audio_target_path', c.target),
                ('directory', 'scan_done_path', c.done),
                ('directory', 'scan_enabled', 'true' if c.scan else 'false'),
                ('directory', 'scan_interval_secs', '0.5'),
                ('directory', 'scan_settle_secs', '0.3'),
                ('server', 'server_seq', str(self.index + 1)),
                ('setting', 'log_level', self.opts.get('log_level', 'debug'))):
            text = ini_set(text, section, key, value)
        if c.cluster_mode and '[http]' in text:
            # Cluster mode reads an upload on whichever node runs its task: on the shared storage.
            text = ini_set(text, 'http', 'upload_path', os.path.join(c.shared, 'uploads', self.name))
        text += db_section(c.dbname, node=self.name)
        if c.webhook_url:
            text += ('\n[webhook]\nurl = %s\nbackoff_base_secs = 0.05\nbackoff_max_secs = 0.5\n'
                     'rescan_secs = 0.3\nconcurrency = 4\n' % c.webhook_url)
        if c.cluster_mode:
            text += ('\n[cluster]\nenabled = true\nbroker_url = amqp://%s:%s@127.0.0.1:%d/%%2F\nqueue = %s\n'
                     'node_dead_secs = %s\nheartbeat_secs = %s\ndelivery_limit = %d\nshared_path = %s\n'
                     % (BROKER_USER[0], BROKER_USER[1], c.broker.port, c.queue, c.node_dead_secs,
                        c.heartbeat_secs, c.delivery_limit, c.shared))
        with open(self.ini, 'w') as f:
            f.write(text + c.extra_ini + extra)

    def record_files(self):
        # Single mode: <base>/records/; cluster mode: <shared_path>/records/<node>/ (the design).
        return sorted(glob.glob(os.path.join(self.base, 'records', '*.json')) +
                      glob.glob(os.path.join(self.cluster.shared, 'records', self.name, '*.json')))

    def records(self):
        return records_in(self.record_files())

    def alive(self):
        pid = self.pid
        return pid is not None and psutil.pid_exists(pid) and \
            psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    def start(self):
        super().start()
        if self.cluster.engine == 'remote':
            self.engines = []
            for _ in range(self.cluster.engines_per_node):
                eng = LegacyEngine(self.port)
                code = eng.start()
                assert code == '0', '%s: legacy engine login answered %s' % (self.name, code)
                self.engines.append(eng)
        return self

    def kill(self):
        """SIGKILL the master and every child at once, as a machine that dies would."""
        sigkill(self)
        for eng in self.engines:
            eng.close()
        self.engines = []

    def stop(self):
        super().stop()
        for eng in self.engines:
            eng.close()
        self.engines = []


class HAProxy:
    """Debian's haproxy in the foreground: TCP front for the nodes' packet ports (health check:
    a real Monitor request answered with 2003), HTTP front for their web ports (/healthz)."""

    def __init__(self, binary, base, nodes, http=False, check_ms=300):
        self.binary = binary
        self.base = base
        self.nodes = nodes
        self.http = http
        self.check_ms = check_ms
        self.port = free_port()
        self.http_port = free_port()
        self.stats = os.path.join(base, 'haproxy.sock')
        self.cfg = os.path.join(base, 'haproxy.cfg')
        self.proc = None

    def config(self):
        check = 'check inter %d fastinter %d downinter %d fall 2 rise 1' % ((self.check_ms,) * 3)
        lines = ['global', '    maxconn 4096', '    stats socket %s mode 600 level admin' % self.stats,
                 'defaults', '    timeout connect 2s', '    timeout client 1h', '    timeout server 1h',
                 '    timeout check 2s', '    retries 3', '    option redispatch', '',
                 'frontend packet', '    mode tcp', '    bind 127.0.0.1:%d' % self.port,
                 '    default_backend packet_nodes', '',
                 'backend packet_nodes', '    mode tcp', '    balance roundrobin', '    option tcp-check',
                 '    tcp-check connect', '    tcp-check send-binary %s' % frame_1003().hex(),
                 '    tcp-check expect string 2003']
        lines += ['    server %s 127.0.0.1:%d %s' % (n.name, n.port, check) for n in self.nodes]
        if self.http:
            lines += ['', 'frontend http', '    mode http', '    bind 127.0.0.1:%d' % self.http_port,
                      '    default_backend http_nodes', '', 'backend http_nodes', '    mode http',
                      '    balance roundrobin', '    option httpchk GET /healthz', '    http-check expect status 200']
            lines += ['    server %s 127.0.0.1:%d %s' % (n.name, n.http_port, check) for n in self.nodes]
        return '\n'.join(lines) + '\n'

    def start(self):
        with open(self.cfg, 'w') as f:
            f.write(self.config())
        check = subprocess.run([self.binary, '-c', '-q', '-f', self.cfg], capture_output=True, text=True)
        assert check.returncode == 0, 'haproxy refuses its config: %s' % check.stderr
        self.log = open(os.path.join(self.base, 'haproxy.log'), 'wb')
        self.proc = subprocess.Popen([self.binary, '-db', '-f', self.cfg], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._listening(), 10, 'haproxy listening on %d' % self.port)
        return self

    def _listening(self):
        assert self.proc.poll() is None, 'haproxy exited: see %s' % self.log.name
        try:
            socket.create_connection(('127.0.0.1', self.port), 1).close()
            return os.path.exists(self.stats)
        except OSError:
            return False

    def command(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.stats)
            s.sendall(line.encode() + b'\n')
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b''.join(chunks).decode()

    def states(self, backend='packet_nodes'):
        """{server name: 'UP' | 'DOWN' | ...} of a backend, from `show stat`."""
        text = self.command('show stat')
        header, *rows = [line for line in text.splitlines() if line.strip()]
        names = header.lstrip('# ').split(',')
        out = {}
        for row in rows:
            rec = dict(zip(names, row.split(',')))
            if rec['pxname'] == backend and rec['svname'] not in ('FRONTEND', 'BACKEND'):
                out[rec['svname']] = rec['status'].split()[0]
        return out

    def wait_state(self, name, state, timeout=20, backend='packet_nodes'):
        wait_for(lambda: self.states(backend).get(name) == state, timeout,
                 'haproxy to see %s %s in %s' % (name, state, backend))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self.log.close()


class BrokerLink(Proxy):
    """The nodes' way to RabbitMQ: a TCP proxy that cut_for(S) closes every connection of and
    refuses new ones for S seconds (a network cut, the broker itself untouched)."""

    def __init__(self):
        super().__init__(target=BROKER)
        self.timer = None

    def cut_for(self, secs):
        self.cut()
        self.timer = threading.Timer(secs, self.restore)
        self.timer.daemon = True
        self.timer.start()
        return self.timer

    def close(self):
        if self.timer:
            self.timer.cancel()
        super().close()


def delete_queues(names):
    """Remove the broker queues a test made (pika, straight to the broker)."""
    import pika
    params = pika.ConnectionParameters('127.0.0.1', BROKER[1], credentials=pika.PlainCredentials(*BROKER_USER),
                                       connection_attempts=3, retry_delay=1, socket_timeout=5)
    conn = pika.BlockingConnection(params)
    try:
        for name in names:
            ch = conn.channel()
            try:
                ch.queue_delete(name)
                ch.close()
            except pika.exceptions.ChannelClosed:
                pass          # never declared: nothing to delete
    finally:
        conn.close()


def broker_queues(prefix):
    """Names of the broker's queues that start with `prefix` (rabbitmqctl, on this machine)."""
    ctl = shutil.which('rabbitmqctl') or '/usr/sbin/rabbitmqctl'
    if not os.path.exists(ctl):
        return []
    proc = subprocess.run([ctl, '-q', 'list_queues', 'name'], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith(prefix)]


class Cluster:
    """N nodes, HAProxy, a broker link, one database, one queue, one webhook receiver.

    cluster_mode=False runs the same nodes as islands (no [cluster] section: single-node
    svcmgr), which the harness test and the bench's single-node figures use."""

    def __init__(self, base, haproxy, dbname, n=3, cluster_mode=True, engine='remote', engines_per_node=1,
                 scan=False, webhook=True, http=False, node_dead_secs=4, heartbeat_secs=0.5, delivery_limit=2,
                 extra_ini='', broker_link=True, **node_opts):
        self.base = str(base)
        self.dbname = dbname
        self.cluster_mode = cluster_mode
        self.engine = engine
        self.engines_per_node = engines_per_node
        self.scan = scan
        self.node_dead_secs = node_dead_secs
        self.heartbeat_secs = heartbeat_secs
        self.delivery_limit = delivery_limit
        self.extra_ini = extra_ini
        self.queue = 'svcmgr.t.%s' % uuid.uuid4().hex[:12]
        self.shared = os.path.join(self.base, 'shared')
        self.drop = os.path.join(self.shared, 'drop')
        self.done = os.path.join(self.shared, 'done')
        self.data = os.path.join(self.shared, 'data')
        self.target = os.path.join(self.shared, 'target')
        for folder in (self.drop, self.done, self.data, self.target):
            os.makedirs(folder, exist_ok=True)
        self.receiver = Receiver() if webhook else None
        self.webhook_url = self.receiver.url if webhook else ''
        # broker_link=False: the nodes reach RabbitMQ straight (the bench: no relay in the path).
        self.broker = BrokerLink() if broker_link else SimpleNamespace(port=BROKER[1], close=lambda: None)
        opts = dict(engine=engine, workers=2, max_tasks=1000, timeout=60, roots='%s, data' % self.shared,
                    engine_slots=max(1, engines_per_node), engine_concurrency=8, http='true' if http else 'false')
        opts.update(node_opts)
        self.nodes = [Node(self, i, **opts) for i in range(n)]
        self.haproxy = HAProxy(haproxy, self.base, self.nodes, http=http)
        self.started = False

    # ------------------------------------------------------------ life

    def start(self):
        self.nodes[0].cli('db', 'init', check=True)
        for node in self.nodes:
            node.start()
        self.haproxy.start()
        for node in self.nodes:
            self.haproxy.wait_state(node.name, 'UP')
        self.started = True
        return self

    def kill(self, i):
        self.nodes[i].kill()

    def restart(self, i):
        node = self.nodes[i]
        if node.alive():
            node.kill()
        # A SIGKILLed master leaves its pid file: `start` must see the pid is gone, not refuse.
        node.start()
        return node

    def live_nodes(self):
        return [n for n in self.nodes if n.alive()]

    def close(self):
        """Stop everything this cluster started, drop its queues; the database is the fixture's."""
        try:
            self.haproxy.stop()
        finally:
            for node in self.nodes:
                try:
                    node.stop()
                except AssertionError:
                    node.kill()
                finally:
                    node.kill()
            if self.receiver:
                self.receiver.stop()
            self.broker.close()
            if self.cluster_mode:
                names = {self.queue, self.queue + '.dead'} | {'%s.reply.%s' % (self.queue, n.name)
                                                             for n in self.nodes}
                names.update(broker_queues(self.queue))
                delete_queues(sorted(names))

    # ------------------------------------------------------------ driving

    def client(self, **kw):
        """A protocol client connected through HAProxy."""
        return Client(self.haproxy.port, **kw)

    def audio(self, name='en_morning.wav'):
        """(folder, name) of a fixture copied into the shared data folder once."""
        dest = os.path.join(self.data, name)
        if not os.path.exists(dest):
            # Clients call this from many threads: a half-copied file must never be visible.
            part = '%s.%s.part' % (dest, uuid.uuid4().hex[:8])
            shutil.copy(os.path.join(FIXTURES, name), part)
            os.replace(part, dest)
        return self.data, name

    def request(self, sid, name='en_morning.wav'):
        folder, name = self.audio(name)
        return transcribe_req(folder, name, sid=sid)

    def drop_files(self, n, prefix='drop', name='en_morning.wav'):
        """Copy `n` files into the shared drop folder the way a recorder does: written under a
        .part name, then renamed (the scanner ignores *.part)."""
        names = []
        for i in range(n):
            final = '%s%04d.wav' % (prefix, i)
            part = os.path.join(self.drop, final + '.part')
            shutil.copy(os.path.join(FIXTURES, name), part)
            os.rename(part, os.path.join(self.drop, final))
            names.append(final)
        return names

    def quiet(self):
        """True when no live node holds a task admitted there that is not answered yet (Monitor's
        `cluster` part: waiting); what a dead node held is the cluster's to finish."""
        for node in self.live_nodes():
            try:
                part = monitor(node, 'cluster').get('cluster') or {}
            except (OSError, AssertionError):
                return False
            if part.get('waiting', 0) or part.get('unpublished', 0):
                return False
        return True

    # ------------------------------------------------------------ counting

    def records(self):
        """Every record line of every node (dead ones included), with the node that wrote it."""
        out = []
        for node in self.nodes:
            out.extend(dict(rec, _node=node.name) for rec in node.records())
        return out

    def record_counts(self):
        return collections.Counter(r['data']['speechID'] for r in self.records())

    def task_rows(self):
        return {r['speech_id']: r for r in query(self.dbname, 'SELECT * FROM task')}

    def final_rows(self):
        return {sid: r for sid, r in self.task_rows().items() if r['finished_at'] is not None}

    def cluster_rows(self):
        try:
            return {r['speech_id']: r for r in query(self.dbname, 'SELECT * FROM cluster_task')}
        except pymysql.err.ProgrammingError:
            return {}            # single mode: no such table

    def webhook_ids(self):
        """{speechID: set of webhook ids} received (a retried delivery has the same id)."""
        out = collections.defaultdict(set)
        for req in list(self.receiver.requests):
            body = json.loads(req['body'])
            out[body['speechID']].add(req['headers']['webhook-id'])
        return out

    def exactly_once_problems(self, sids):
        """What is wrong with `sids` ending each with one record, one final row and one webhook id."""
        records = self.record_counts()
        rows = self.final_rows()
        hooks = self.webhook_ids() if self.receiver else None
        problems = []
        for sid in sorted(sids):
            if records.get(sid, 0) != 1:
                problems.append('%s: %d records' % (sid, records.get(sid, 0)))
            if sid not in rows:
                problems.append('%s: no final row' % sid)
            if hooks is not None and len(hooks.get(sid, ())) != 1:
                problems.append('%s: %d webhook ids' % (sid, len(hooks.get(sid, ()))))
        for sid, count in records.items():
            if count > 1 and sid not in sids:
                problems.append('%s (not expected): %d records' % (sid, count))
        return problems

    def wait_exactly_once(self, sids, timeout=120):
        """Wait until every speechID in `sids` has its record, final row and webhook id; fail
        with the first problems at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.exactly_once_problems(sids)
            if not problems:
                return
            if time.monotonic() > deadline:
                raise AssertionError('%d problem(s) after %.0f s, e.g.: %s'
                                     % (len(problems), timeout, '; '.join(problems[:10])))
            time.sleep(0.5)


def drop_database(name):
    with server_connection() as conn, conn.cursor() as cur:
        cur.execute('DROP DATABASE IF EXISTS `%s`' % name)
