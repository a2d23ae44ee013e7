"""Cluster mode ([cluster] enabled) against real RabbitMQ (127.0.0.1:5672) and real MariaDB:
real daemons, each test with its own queue name and its own database."""
import collections
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pika
import psutil
import pytest
import requests

import _config
from cluster import sigkill as kill
from conftest import FIXTURES, ROOT, records_in, transcribe_req, wait_for
from helpers import Closing, Proxy, Receiver, db_section, monitor, query
from legacy_engine import LegacyEngine
from test_safety_records import fill, tmpfs  # noqa: F401 (a fixture)
from test_web import web_process

BROKER = 'amqp://guest:guest@127.0.0.1:5672/%2F'


def broker():
    return pika.BlockingConnection(pika.URLParameters(BROKER))


@pytest.fixture
def qname():
    """A queue name of this test's own; its queues are deleted at the end."""
    name = 'svcmgr.t.%s' % uuid.uuid4().hex[:12]
    yield name
    delete_queues(name)


def delete_queues(name):
    out = subprocess.run(['rabbitmqctl', '-q', 'list_queues', 'name'], capture_output=True, text=True, timeout=60)
    conn = broker()
    try:
        for q in out.stdout.split():
            if q == name or q.startswith(name + '.'):
                conn.channel().queue_delete(q)
    finally:
        conn.close()


def cluster_ini(dbname, qname, node, dead=3.0, beat=0.5, extra=''):
    return db_section(dbname, node=node) + (
        '[cluster]\nenabled = true\nbroker_url = %s\nqueue = %s\nnode_dead_secs = %s\nheartbeat_secs = %s\n%s'
        % (BROKER, qname, dead, beat, extra))


@pytest.fixture
def shared(tmp_path):
    """The storage every node mounts: the audio lives here."""
    folder = tmp_path / 'shared'
    folder.mkdir()
    return str(folder)


@pytest.fixture
def node(make_daemon, dbname, qname, shared):
    def make(name, start=True, ini_extra='', **opts):
        opts.setdefault('roots', 'batch, data, %s' % shared)
        d = make_daemon(**opts)
        d.write_ini(cluster_ini(dbname, qname, name, extra=ini_extra))
        d.node = name
        if start:
            d.cli('db', 'init', check=True)
            d.start()
            # Its queues exist from here on: what a test publishes straight to the broker is not dropped.
            wait_for(lambda: monitor(d, 'cluster')['cluster']['brokerUp'], 30, '%s connected to the broker' % name)
        return d
    return make


def recv_raw(c, timeout=60):
    """One frame as the daemon sent it: (type, body bytes)."""
    deadline = time.monotonic() + timeout
    while not c.frames:
        c.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = c.sock.recv(1 << 16)
        if not data:
            raise ConnectionError('closed')
        c.frames.extend(c.decoder.feed(data))
    return c.frames.pop(0)


def put_fixture(shared, name, dest=None):
    shutil.copy(os.path.join(FIXTURES, name), os.path.join(shared, dest or name))
    return shared, dest or name


def cluster_rows(dbname):
    return {r['speech_id']: r for r in query(dbname, 'SELECT * FROM cluster_task')}


def task_rows(dbname):
    return {r['speech_id']: r for r in query(dbname, 'SELECT * FROM task')}


# ---------------------------------------------------------------- configuration

def test_cluster_needs_the_database_and_checks_its_keys(tmp_path):
    ini = tmp_path / 'app.ini'

    def problems(text):
        ini.write_text(text)
        with pytest.raises(_config.ConfigError) as err:
            _config.load(str(ini))
        return err.value.problems

    on = '[db]\nenabled = true\n[cluster]\nenabled = true\n'
    assert 'app.ini [cluster] enabled: cluster mode keeps its state in the database' in \
        problems('[cluster]\nenabled = true\n')[0]
    assert any('broker_url' in p and 'amqp://' in p for p in problems(on + 'broker_url = http://x/\nqueue = "a b"\n'))
    assert 'queue' in problems(on + 'queue = "a b"\n')[0]
    assert 'node_dead_secs' in problems(on + 'node_dead_secs = 3\nheartbeat_secs = 2\n')[0]
    # The node's name is a folder on the shared storage: nothing that leaves it or hides it.
    for bad in ('..', '../stt2', 'stt1/x', '.hidden', 'x' * 129, '"stt 1"'):
        found = problems(on.replace('[db]\n', '[db]\nnode = %s\n' % bad) + 'shared_path = nfs\n')
        assert '[db] node: in cluster mode use 1-128 characters' in found[0], (bad, found)
    ini.write_text(on + 'shared_path = nfs\n')
    cfg = _config.load(str(ini))
    assert cfg['cluster']['shared_path'] == str(tmp_path / 'nfs') and cfg['cluster']['delivery_limit'] == 2


def test_cluster_mode_keeps_uploads_on_the_shared_storage(tmp_path):
    ini = tmp_path / 'app.ini'
    on = '[db]\nenabled = true\nnode = n7\n[cluster]\nenabled = true\n'

    def load(text):
        ini.write_text(text)
        return _config.load(str(ini))

    with pytest.raises(_config.ConfigError) as err:
        load(on)
    assert 'app.ini [cluster] shared_path: cluster mode with [http] enabled needs it' in err.value.problems[0]
    assert load(on + '[http]\nenabled = false\n')['cluster']['enabled']
    # Unset, or the shipped app.ini's `uploads`: <shared_path>/uploads/<node>/, which every node may read.
    for http in ('', '[http]\nupload_path = uploads\n'):
        cfg = load(on + 'shared_path = nfs\n' + http)
        assert cfg['http']['upload_path'] == str(tmp_path / 'nfs' / 'uploads' / 'n7')
        assert str(tmp_path / 'nfs' / 'uploads') in _config.task_roots(cfg)
    assert load(on + 'shared_path = nfs\n[http]\nupload_path = nfs/uploads/mine\n')['http']['upload_path'] == \
        str(tmp_path / 'nfs' / 'uploads' / 'mine')
    with pytest.raises(_config.ConfigError) as err:
        load(on + 'shared_path = nfs\n[http]\nupload_path = /var/tmp/up\n')
    assert 'app.ini [http] upload_path: in cluster mode it must lie in %s' % (tmp_path / 'nfs' / 'uploads') in \
        err.value.problems[0]
    # Single-node mode: as before.
    assert load('[http]\nupload_path = /var/tmp/up\n')['http']['upload_path'] == '/var/tmp/up'


def test_single_node_mode_loads_no_broker_client(daemon):
    code = ('import sys; sys.path.insert(0, %r); import _master, _status\n'
            'print("pika" in sys.modules, "_cluster_thread" in sys.modules)' % ROOT)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ['False', 'False'], out.stderr
    assert 'cluster' not in monitor(daemon)
    assert 'cluster' not in daemon.log_text().lower()


def test_batched_statements_decide_each_task_as_one_by_one_would(tmp_path, dbname):
    """The cluster thread enters, takes and ends many tasks per transaction with a few
    multi-row statements; each task must still get what insert(), take_fast() and finish()
    would give it alone."""
    import _cluster_db as cdb
    import _db
    ini = tmp_path / 'app.ini'
    ini.write_text(db_section(dbname))
    cfg = _config.load(str(ini))
    _db.init(cfg, out=lambda *a: None)
    conn = cdb.connect(cfg)
    try:
        cdb.ensure_tables(conn)
        assert cdb.insert(conn, 'busy', 't-busy', 'n1', 'client', 30) == (True, None)
        assert cdb.insert(conn, 'old', 't-old', 'n1', 'client', 30) == (True, None)
        cdb.finish(conn, 'old', 't-old', {'result': '0'})
        assert cdb.insert(conn, 'file', 't-file', 'n1', 'scanner', 30) == (True, None)
        cdb.finish(conn, 'file', 't-file', {'result': '0', 'x': 1})
        entered = cdb.atomic(conn, cdb.insert_many, [
            ('new1', 'a1', 'client', '{}'), ('busy', 'a2', 'client', '{}'), ('old', 'a3', 'client', '{}'),
            ('file', 'a4', 'scanner', '{}'), ('new2', 'a5', 'scanner', '{}')], 'n2', 30, 'life2')
        # New rows and a final one taken over are entered; a task in progress is refused; a
        # scanned file whose task is final gets that answer.
        assert entered == [(True, None), (False, None), (True, None), (False, '{"result": "0", "x": 1}'),
                           (True, None)]
        rows = {r[0]: r[1:] for r in query_rows(dbname, 'SELECT speech_id, token, state, origin_node'
                                                        ' FROM cluster_task')}
        assert rows['old'] == ('a3', 'queued', 'n2') and rows['busy'] == ('t-busy', 'queued', 'n1')
        # A second delivery of the same task in one batch, a wrong token, one started too often.
        query(dbname, "UPDATE cluster_task SET attempts = 2 WHERE speech_id = 'new2'")
        taken = cdb.atomic(conn, cdb.take_many, [('new1', 'a1'), ('new1', 'a1'), ('busy', 'wrong'),
                                                 ('old', 'a3'), ('new2', 'a5')], 'n3', 'life3', 2)
        assert taken == [True, False, False, True, False]
        assert cdb.take(conn, 'new1', 'a1', 'n3', 'life3', 30, 2)[0] == cdb.HOLD
        cdb.atomic(conn, cdb.finish_many, [('new1', 'a1', {'result': '0'}, None),
                                           ('old', 'zz', {'result': '1'}, None),
                                           ('busy', 't-busy', {'result': '5'}, None)])
        rows = {r[0]: r[1:] for r in query_rows(dbname, 'SELECT speech_id, state, answer FROM cluster_task')}
        assert rows['new1'] == ('final', '{"result": "0"}') and rows['busy'] == ('final', '{"result": "5"}')
        assert rows['old'] == ('running', None)         # not its token: left alone
    finally:
        conn.close()


def query_rows(dbname, sql):
    return [tuple(r.values()) for r in query(dbname, sql)]


# ---------------------------------------------------------------- one node

def test_one_node_answers_byte_for_byte_as_single_node_mode(make_daemon, node, shared, dbname, qname):
    folder, name = put_fixture(shared, 'en_hello.wav')
    single = make_daemon(roots='batch, data, %s' % shared).start()
    one = node('n1')
    answers = []
    for d in (single, one):
        with Closing(d.client()) as c:
            c.send(1002, transcribe_req(folder, name, sid='same1'))
            answers.append(recv_raw(c, 120))
    assert answers[0][0] == answers[1][0] == 2002
    assert answers[0][1] == answers[1][1], answers
    assert json.loads(answers[1][1])['result'] == '0'
    # One record, one final row, and the cluster row final with the same answer.
    wait_for(lambda: len(one.records()) == 1, 30, 'the record')
    rows = wait_for(lambda: (lambda r: r if r.get('same1', {}).get('finished_at') else None)(task_rows(dbname)),
                    30, 'the final row')
    assert rows['same1']['node'] == 'n1' and rows['same1']['result'] == '0'
    crow = cluster_rows(dbname)['same1']
    assert crow['state'] == 'final' and crow['origin_node'] == crow['run_node'] == 'n1' and crow['attempts'] == 1
    assert json.loads(crow['answer']) == json.loads(answers[1][1])
    body = monitor(one)
    assert body['cluster']['node'] == 'n1' and body['cluster']['brokerUp'] is True
    wait_for(lambda: monitor(one)['cluster'].get('alive') == 1, 10, 'the cluster view')


# ---------------------------------------------------------------- several nodes

def remote_node(node, name, **opts):
    """A node whose engine is the scripted legacy engine (none logged in yet: it takes no task)."""
    opts.setdefault('engine', 'remote')
    opts.setdefault('workers', 1)
    return node(name, **opts)


def test_a_task_admitted_on_one_node_runs_on_another(node, shared, dbname, qname):
    a, b = remote_node(node, 'na'), remote_node(node, 'nb')
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca, Closing(b.client()) as cb:
        ca.send(1002, transcribe_req(folder, name, sid='x1'))
        wait_for(lambda: cluster_rows(dbname).get('x1'), 30, 'the cluster row')
        # No node has an engine yet: it waits in the queue. The same speechID on the other node is refused.
        cb.send(1002, transcribe_req(folder, name, sid='x1'))
        _, refused = cb.recv(30)
        assert refused['result'] == '1' and 'already in progress in the cluster' in refused['message']
        # Monitor's task list on the node holding the client shows the task while it waits.
        assert [(t['speechID'], t['state']) for t in monitor(a, 'task')['task']] == [('x1', 'INIT')]
        assert monitor(b, 'task')['task'] == []
        eng = LegacyEngine(b.port)
        assert eng.start() == '0'
        _, answer = ca.recv(60)
    assert answer['result'] == '0' and answer['speechID'] == 'x1'
    assert answer['transcript'] == '안녕하세요 고객님, x1 통화입니다'
    assert [r['speechID'] for r in eng.received] == ['x1']
    recs = b.wait_records(1)
    assert [r['data']['speechID'] for r in recs] == ['x1'] and a.records() == []
    row = wait_for(lambda: (lambda r: r if r.get('x1', {}).get('finished_at') else None)(task_rows(dbname)),
                   30, 'the final row')['x1']
    assert row['node'] == 'nb' and row['result'] == '0'
    crow = cluster_rows(dbname)['x1']
    assert (crow['origin_node'], crow['run_node'], crow['state'], crow['attempts']) == ('na', 'nb', 'final', 1)
    # Every node sees the whole cluster: Monitor and `svcmgr.py cluster status`.
    view = wait_for(lambda: (lambda c: c if c.get('alive') == 2 and c['queueDepth'] == 0 else None)(
        monitor(a, 'cluster')['cluster']), 15, 'two nodes alive, the queue empty')
    assert {n['node'] for n in view['nodes']} == {'na', 'nb'}
    out = a.cli('cluster', 'status', check=True).stdout
    assert '2 node(s) alive, 0 dead' in out and 'na ' in out and 'nb ' in out, out
    js = json.loads(a.cli('cluster', 'status', '--json', check=True).stdout)
    assert js['queue'] == {'tasks': 0, 'dead': 0} and js['alive'] == 2
    eng.close()


def test_tasks_spread_over_nodes_and_each_ends_once(node, shared, dbname, qname):
    nodes = [remote_node(node, 'n%d' % i, workers=1) for i in range(3)]
    engines = [LegacyEngine(d.port, delay=0.05) for d in nodes]
    for e in engines:
        assert e.start() == '0'
    folder, name = put_fixture(shared, 'en_hello.wav')
    sids = ['s%02d' % i for i in range(30)]
    clients = [n.client() for n in nodes]
    for i, sid in enumerate(sids):
        clients[i % 3].send(1002, transcribe_req(folder, name, sid=sid))
    answers = {}
    for i, c in enumerate(clients):
        for _, body in c.recv_n(10, timeout=120):
            answers[body['speechID']] = body
            assert body['speechID'] in sids[i::3]
    assert sorted(answers) == sids and all(b['result'] == '0' for b in answers.values())
    ran = [sorted(r['speechID'] for r in e.received) for e in engines]
    assert sorted(sum(ran, [])) == sids
    assert sum(1 for r in ran if r) >= 2, ran          # the queue spread them
    recs = wait_for(lambda: (lambda r: r if len(r) >= 30 else None)(sum((n.records() for n in nodes), [])),
                    60, '30 records')
    assert sorted(r['data']['speechID'] for r in recs) == sids
    rows = wait_for(lambda: (lambda r: r if sum(1 for x in r.values() if x['finished_at']) == 30 else None)(
        task_rows(dbname)), 60, '30 final rows')
    assert sorted(rows) == sids
    for c in clients:
        c.close()
    for e in engines:
        e.close()


def test_shared_drop_folder_each_file_claimed_once(node, shared, dbname, qname):
    drop = os.path.join(shared, 'drop')
    os.makedirs(drop)
    nodes = []
    for i in range(2):
        d = remote_node(node, 'd%d' % i, start=False)
        with open(d.ini) as f:
            text = f.read()
        text = text.replace('scan_enabled = false', 'scan_enabled = true').replace(
            'audio_source_path = batch', 'audio_source_path = %s' % drop).replace(
            'scan_interval_secs = 1\n', 'scan_interval_secs = 0.3\n')
        with open(d.ini, 'w') as f:
            f.write(text)
        d.cli('db', 'init', check=True)
        nodes.append(d.start())
    engines = [LegacyEngine(d.port) for d in nodes]
    for e in engines:
        assert e.start() == '0'
    names = ['call-%02d.wav' % i for i in range(20)]
    for n in names:
        shutil.copy(os.path.join(FIXTURES, 'en_hello.wav'), os.path.join(drop, n + '.tmp'))
    for n in names:
        os.rename(os.path.join(drop, n + '.tmp'), os.path.join(drop, n))
    recs = wait_for(lambda: (lambda r: r if len(r) >= 20 else None)(sum((d.records() for d in nodes), [])),
                    120, '20 records')
    time.sleep(0.5)
    recs = sum((d.records() for d in nodes), [])
    assert len(recs) == 20 and len({r['data']['speechID'] for r in recs}) == 20
    assert sorted(r['request']['fileName'] for r in recs) == names
    wait_for(lambda: not os.listdir(os.path.join(drop, '.processing')) if os.path.isdir(
        os.path.join(drop, '.processing')) else True, 30, '.processing emptied')
    assert [n for n in os.listdir(drop) if not n.startswith('.')] == []
    assert sum(len(e.received) for e in engines) == 20
    for e in engines:
        e.close()


# ---------------------------------------------------------------- faults



def final_rows(dbname, n):
    return wait_for(lambda: (lambda r: r if sum(1 for x in r.values() if x['finished_at']) >= n else None)(
        task_rows(dbname)), 60, '%d final rows' % n)


def test_a_killed_node_s_tasks_run_elsewhere_once(node, shared, dbname, qname):
    a, b, c = (remote_node(node, n) for n in ('ka', 'kb', 'kc'))
    eb = LegacyEngine(b.port, mode='silent')        # takes the tasks and never answers
    assert eb.start() == '0'
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca:
        for sid in ('k1', 'k2'):
            ca.send(1002, transcribe_req(folder, name, sid=sid))
        wait_for(lambda: [r['run_node'] for r in cluster_rows(dbname).values()] == ['kb', 'kb'], 30,
                 'both tasks taken by kb')
        wait_for(lambda: eb.received, 30, 'kb sent a 3001')
        ec = LegacyEngine(c.port)
        assert ec.start() == '0'
        t0 = time.monotonic()
        kill(b)
        answers = {body['speechID']: body for _, body in ca.recv_n(2, timeout=60)}
        waited = time.monotonic() - t0
    assert {s: b['result'] for s, b in answers.items()} == {'k1': '0', 'k2': '0'}
    assert sorted(r['speechID'] for r in ec.received) == ['k1', 'k2']
    # Held while kb's heartbeat was fresh (node_dead_secs = 3), then run on kc.
    assert 2.4 < waited < 30, waited
    assert sorted(r['data']['speechID'] for r in c.wait_records(2)) == ['k1', 'k2']
    assert b.records() == [] and a.records() == []
    rows = final_rows(dbname, 2)
    assert {s: (r['node'], r['result']) for s, r in rows.items()} == {'k1': ('kc', '0'), 'k2': ('kc', '0')}
    crows = cluster_rows(dbname)
    assert all(r['run_node'] == 'kc' and r['attempts'] == 2 and r['state'] == 'final' for r in crows.values())
    view = wait_for(lambda: (lambda v: v if v.get('dead') == 1 else None)(monitor(a, 'cluster')['cluster']),
                    15, 'kb seen dead')
    assert [n['node'] for n in view['nodes'] if not n['alive']] == ['kb']
    ec.close()


def test_a_task_that_kills_its_node_twice_ends_with_result_9(node, shared, dbname, qname):
    a, b, c = (remote_node(node, n) for n in ('pa', 'pb', 'pc'))
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca:
        ca.send(1002, transcribe_req(folder, name, sid='p1'))
        for victim in (b, c):
            eng = LegacyEngine(victim.port, mode='silent')
            assert eng.start() == '0'
            wait_for(lambda: eng.received, 60, '%s took the task' % victim.node)
            kill(victim)
        b.start()       # a new life of pb, with an engine that answers: it must not run the task a third time
        eb = LegacyEngine(b.port)
        assert eb.start() == '0'
        _, answer = ca.recv(60)
    assert answer['result'] == '9' and 'started 2 time(s)' in answer['message'], answer
    assert eb.received == []
    recs = b.wait_records(1)
    assert [(r['data']['speechID'], r['data']['result']) for r in recs] == [('p1', '9')]
    rows = final_rows(dbname, 1)
    assert rows['p1']['result'] == '9' and rows['p1']['node'] == 'pb'
    assert cluster_rows(dbname)['p1']['attempts'] == 3
    eb.close()


def proxied_node(node, name, proxy, **opts):
    """A started remote_node whose broker connection goes through `proxy` (which the test cuts)."""
    d = remote_node(node, name, start=False, **opts)
    with open(d.ini) as f:
        text = f.read()
    with open(d.ini, 'w') as f:
        f.write(text.replace(BROKER, 'amqp://guest:guest@127.0.0.1:%d/%%2F' % proxy.port))
    d.cli('db', 'init', check=True)
    d.start()
    return d


def test_a_queue_declared_with_other_arguments_is_retried_without_leaking_connections(node, qname):
    """An operator who changed delivery_limit finds the quorum queue declared with the old
    x-delivery-limit: the broker refuses the declaration (406) at every retry; the node says
    so, keeps no connection of a failed try, and connects once the queue is gone."""
    conn = broker()
    try:
        conn.channel().queue_declare(qname, durable=True, arguments={'x-queue-type': 'quorum',
                                                                     'x-delivery-limit': 7})
    finally:
        conn.close()
    d = node('lk', start=False)
    d.cli('db', 'init', check=True)
    d.start()

    def broker_sockets():
        return [c for c in psutil.Process(d.pid).net_connections('tcp') if c.raddr and c.raddr[1] == 5672]
    wait_for(lambda: d.log_text().count('PRECONDITION_FAILED') >= 3, 30, 'three refused tries')
    assert len(broker_sockets()) <= 1
    assert monitor(d, 'cluster')['cluster']['brokerUp'] is False
    conn = broker()
    try:
        conn.channel().queue_delete(qname)
    finally:
        conn.close()
    wait_for(lambda: monitor(d, 'cluster')['cluster']['brokerUp'], 30, 'connected once the queue is gone')
    assert len(broker_sockets()) == 1


def test_a_cut_broker_connection_of_a_live_node_runs_nothing_twice(node, shared, dbname, qname):
    proxy = Proxy(target=('127.0.0.1', 5672))
    try:
        a = remote_node(node, 'ca')
        b = proxied_node(node, 'cb', proxy)
        c = remote_node(node, 'cc')
        eb = LegacyEngine(b.port, delay=4.0)
        assert eb.start() == '0'
        folder, name = put_fixture(shared, 'en_hello.wav')
        with Closing(a.client()) as ca:
            ca.send(1002, transcribe_req(folder, name, sid='c1'))
            wait_for(lambda: eb.received, 30, 'cb sent a 3001')
            ec = LegacyEngine(c.port)
            assert ec.start() == '0'
            proxy.cut()                 # cb is alive, its broker connection is gone: c1 is redelivered to cc
            _, answer = ca.recv(60)
            assert answer['result'] == '0' and answer['transcript'].endswith('c1 통화입니다')
            proxy.restore()
            with pytest.raises(TimeoutError):
                ca.recv(3)              # one answer only
        assert ec.received == []
        assert [r['data']['speechID'] for r in b.wait_records(1)] == ['c1'] and c.records() == []
        wait_for(lambda: monitor(b, 'cluster')['cluster']['brokerUp'], 30, 'cb reconnected')
        rows = final_rows(dbname, 1)
        assert rows['c1']['node'] == 'cb' and cluster_rows(dbname)['c1']['attempts'] == 1
        eb.close()
        ec.close()
    finally:
        proxy.close()


def test_broker_down_tasks_wait_bounded_by_max_tasks_then_all_run(node, shared, dbname, qname):
    proxy = Proxy(target=('127.0.0.1', 5672))
    try:
        a = proxied_node(node, 'wa', proxy, max_tasks=3)
        b = remote_node(node, 'wb')
        eb = LegacyEngine(b.port)
        assert eb.start() == '0'
        wait_for(lambda: monitor(a, 'cluster')['cluster']['brokerUp'], 30, 'wa connected')
        proxy.cut()
        wait_for(lambda: not monitor(a, 'cluster')['cluster']['brokerUp'], 30, 'wa sees the broker gone')
        folder, name = put_fixture(shared, 'en_hello.wav')
        with Closing(a.client()) as ca:
            for i in range(4):
                ca.send(1002, transcribe_req(folder, name, sid='w%d' % i))
            _, over = ca.recv(30)
            assert over['speechID'] == 'w3' and over['result'] == '6', over
            with pytest.raises(TimeoutError):
                ca.recv(2)              # the other three wait here
            proxy.restore()
            answers = {body['speechID']: body['result'] for _, body in ca.recv_n(3, timeout=60)}
        assert answers == {'w0': '0', 'w1': '0', 'w2': '0'}
        assert sorted(r['data']['speechID'] for r in b.wait_records(3)) == ['w0', 'w1', 'w2']
        eb.close()
    finally:
        proxy.close()


def scanning_node(node, name, drop, **opts):
    d = remote_node(node, name, start=False, **opts)
    with open(d.ini) as f:
        text = f.read()
    with open(d.ini, 'w') as f:
        f.write(text.replace('scan_enabled = false', 'scan_enabled = true').replace(
            'audio_source_path = batch', 'audio_source_path = %s' % drop).replace(
            'scan_interval_secs = 1\n', 'scan_interval_secs = 0.3\n'))
    d.cli('db', 'init', check=True)
    return d.start()


def test_orphaned_claims_are_adopted_once_their_node_is_dead(node, shared, dbname, qname):
    drop = os.path.join(shared, 'drop')
    proc = os.path.join(drop, '.processing')
    os.makedirs(proc)
    # What dead nodes left: claimed before entering a row; entered, never published; and recorded
    # but not moved out.
    orphans = {'20261201_040000_000001': 'never-entered.wav', '20261201_040000_000002': 'never-published.wav',
               '20261201_040000_000003': 'recorded.wav'}
    for sid, name in orphans.items():
        shutil.copy(os.path.join(FIXTURES, 'en_hello.wav'), os.path.join(proc, '%s__%s' % (sid, name)))
    d = remote_node(node, 'o1', start=False)
    d.cli('db', 'init', check=True)
    query(dbname, "INSERT INTO cluster_task (speech_id, token, origin_node, state, attempts, source, created_at,"
                  " updated_at) VALUES ('20261201_040000_000002', 'old', 'ghost', 'queued', 0, 'scanner',"
                  " NOW(6) - INTERVAL 1 HOUR, NOW(6) - INTERVAL 1 HOUR)")
    query(dbname, "INSERT INTO cluster_task (speech_id, token, origin_node, run_node, state, attempts, source,"
                  " answer, created_at) VALUES ('20261201_040000_000003', 'old3', 'ghost', 'ghost', 'final', 1,"
                  " 'scanner', %s, NOW(6))",
          (json.dumps({'result': '0', 'state': 'DONE', 'speechID': '20261201_040000_000003'}),))
    t0 = time.monotonic()
    a = scanning_node(node, 'o1', drop)
    eng = LegacyEngine(a.port)
    assert eng.start() == '0'
    recs = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(a.records()), 60, 'two records')
    assert time.monotonic() - t0 > 2.5        # not before node_dead_secs
    assert sorted(r['data']['speechID'] for r in recs) == ['20261201_040000_000001', '20261201_040000_000002']
    wait_for(lambda: not os.path.isdir(proc) or not os.listdir(proc), 30, '.processing emptied')
    assert sorted(r['speechID'] for r in eng.received) == ['20261201_040000_000001', '20261201_040000_000002']
    time.sleep(1)
    assert len(a.records()) == 2
    rows = final_rows(dbname, 2)
    assert '20261201_040000_000003' not in rows
    eng.close()


def ghost_recorded(shared, dbname, qname, req, now):
    """What a node "ghost" left when it died: the record of req's task on the shared storage, its
    cluster_task row still running, and the task's message back in the queue (redelivered).
    Returns the records line and the reply queue's name."""
    from _records import stamp
    sid = req['speechID']
    ghost = os.path.join(shared, 'records', 'ghost')
    os.makedirs(ghost, exist_ok=True)
    line = {'data': {'speechID': sid, 'transcript': 'from the record', 'result': '0'}, 'socket': None,
            'state': 'DONE', 'startTime': stamp(now), 'endTime': stamp(now + 0.5), 'processInterval': [],
            'source': 'client', 'worker': 1, 'duration': 1.5, 'request': {k: v for k, v in req.items()
                                                                          if k != 'speechID'},
            'audioWAV': '%s.wav' % sid, 'audioMP3': ''}
    with open(os.path.join(ghost, time.strftime('%Y%m%d') + '.json'), 'a') as f:
        f.write(json.dumps(line, ensure_ascii=False) + '\n')
    query(dbname, "INSERT INTO cluster_task (speech_id, token, origin_node, run_node, run_token, state, attempts,"
                  " source, created_at) VALUES (%s, 'tok1', 'ghost', 'ghost', 'life1', 'running', 1, 'client',"
                  " NOW(6))", (sid,))
    reply = qname + '.reply.tester'
    conn = broker()
    try:
        ch = conn.channel()
        ch.queue_declare(reply, durable=True)
        ch.basic_publish('', qname, json.dumps({
            'speechID': sid, 'token': 'tok1', 'request': req, 'source': 'client', 'keepSource': False,
            'filePathRaw': None, 'origin': 'ghost', 'reply': reply, 'created': now}).encode(),
            pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()
    return line, reply


def test_a_task_recorded_by_a_node_that_died_before_marking_it_final_is_not_run_again(node, shared, dbname,
                                                                                       qname):
    a = remote_node(node, 'r1', ini_extra='shared_path = %s\n' % shared)
    eng = LegacyEngine(a.port)
    assert eng.start() == '0'
    folder, name = put_fixture(shared, 'en_hello.wav')
    req = transcribe_req(folder, name, sid='rr1')
    now = time.time()
    line, reply = ghost_recorded(shared, dbname, qname, req, now)
    conn = broker()
    try:
        ch = conn.channel()

        def answer():
            method, _, body = ch.basic_get(reply, auto_ack=True)
            return json.loads(body) if method else None
        got = wait_for(answer, 30, 'the answer on the reply queue')
    finally:
        conn.close()
    assert got['answer']['transcript'] == 'from the record' and got['answer']['result'] == '0'
    assert got['answer']['audioWAV'] == 'rr1.wav' and got['token'] == 'tok1'
    assert eng.received == []
    crow = cluster_rows(dbname)['rr1']
    assert crow['state'] == 'final' and crow['run_node'] == 'r1'
    # The dead node's db writer never wrote the final row: the taker writes it from the record.
    row = task_rows(dbname)['rr1']
    assert row['finished_at'] and row['node'] == 'ghost' and row['transcript'] == 'from the record'
    mine = os.path.join(shared, 'records', 'r1')
    assert not os.path.exists(mine) or not os.listdir(mine)
    # With shared_path, a node's own records go to <shared_path>/records/<node>/.
    with Closing(a.client()) as c:
        c.send(1002, transcribe_req(folder, name, sid='rr2'))
        assert c.recv(30)[1]['result'] == '0'
    path = os.path.join(mine, time.strftime('%Y%m%d') + '.json')
    wait_for(lambda: os.path.exists(path) and 'rr2' in open(path).read(), 30, 'the record on the shared storage')
    assert a.records() == []
    eng.close()


def test_webhooks_a_dead_node_never_delivered_go_out_from_a_live_node_with_their_ids(node, shared, dbname, qname):
    """A node killed for good leaves webhooks behind: entries in its outbox on the shared storage
    (adopted by a live node once it is dead), and a task it recorded before it could write its
    outbox entry (the taker that answers from the record sends it). Each goes out with the id the
    dead node gave it or would have given it: one id per task at the receiver."""
    import _webhook
    from _records import TaskRecord
    receiver = Receiver()
    try:
        a = remote_node(node, 'w1', ini_extra='shared_path = %s\n[webhook]\nurl = %s\nrescan_secs = 0.2\n'
                        % (shared, receiver.url))
        eng = LegacyEngine(a.port)
        assert eng.start() == '0'
        folder, name = put_fixture(shared, 'en_hello.wav')
        now = time.time()
        # The dead node's undelivered outbox entry of another task, and of rr1 (as its reporter made it).
        box = _webhook.Outbox(os.path.join(shared, 'records', 'ghost', 'webhook'))
        box.add(box.new_entry('gg1', {'speechID': 'gg1', 'result': '0'}, msg_id='msg_' + 'a' * 32))
        # One it gave up on (failed/): adopted into the live node's failed/, not sent.
        box.add(box.new_entry('gf1', {'speechID': 'gf1', 'result': '0'}, msg_id='msg_' + 'f' * 32), failed=True)
        line, reply = ghost_recorded(shared, dbname, qname, transcribe_req(folder, name, sid='rr1'), now)
        payload = _webhook.build_payload(TaskRecord.from_line(line))
        box.add(box.new_entry('rr1', payload, msg_id=_webhook.entry_id(payload)))
        # rr3: recorded, but the node died before its outbox entry was written.
        line3, _ = ghost_recorded(shared, dbname, qname, transcribe_req(folder, name, sid='rr3'), now + 1)
        payload3 = _webhook.build_payload(TaskRecord.from_line(line3))
        query(dbname, "INSERT INTO cluster_node (node, token, pid, status, broker_up, capacity, running, waiting,"
                      " started_at, alive_at) VALUES ('ghost', 'life1', 1, 'running', 1, 1, 1, 0,"
                      " NOW(6) - INTERVAL 1 HOUR, NOW(6) - INTERVAL 1 HOUR)")
        wait_for(lambda: {'gg1', 'rr1', 'rr3'} <= receiver.speech_ids(), 60, 'the three webhooks at the receiver')
        ids = collections.defaultdict(set)
        with receiver.lock:
            for r in receiver.requests:
                ids[json.loads(r['body'])['speechID']].add(r['headers']['webhook-id'])
        assert ids['gg1'] == {'msg_' + 'a' * 32}
        assert ids['rr1'] == {_webhook.entry_id(payload)}
        assert ids['rr3'] == {_webhook.entry_id(payload3)}
        wait_for(lambda: box.names() == [], 30, "the dead node's outbox emptied")
        own = _webhook.Outbox(os.path.join(shared, 'records', 'w1', 'webhook'))
        wait_for(lambda: box.names(failed=True) == [] and len(own.names(failed=True)) == 1, 30,
                 "the dead node's failed/ entry adopted")
        assert own.read(own.names(failed=True)[0], failed=True)['id'] == 'msg_' + 'f' * 32
        assert 'gf1' not in receiver.speech_ids()
        eng.close()
    finally:
        receiver.stop()


def test_a_stopped_node_gives_its_unfinished_tasks_back_to_the_queue(node, shared, dbname, qname):
    a, b = remote_node(node, 'ta'), remote_node(node, 'tb', graceful=1)
    eb = LegacyEngine(b.port, mode='silent')
    assert eb.start() == '0'
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca:
        ca.send(1002, transcribe_req(folder, name, sid='t1'))
        wait_for(lambda: eb.received, 30, 'tb sent a 3001')
        b.stop()                # SIGTERM: the task is not done within graceful_timeout_secs
        crow = cluster_rows(dbname)['t1']
        assert (crow['state'], crow['attempts']) == ('queued', 0)
        c = remote_node(node, 'tc')
        ec = LegacyEngine(c.port)
        assert ec.start() == '0'
        _, answer = ca.recv(60)
    assert answer['result'] == '0' and [r['speechID'] for r in ec.received] == ['t1']
    assert b.records() == [] and [r['data']['speechID'] for r in c.wait_records(1)] == ['t1']
    rows = final_rows(dbname, 1)
    assert rows['t1']['node'] == 'tc'
    ec.close()


def test_a_task_entered_by_a_node_that_died_before_publishing_it_still_runs_once(node, shared, dbname, qname):
    a = remote_node(node, 'u1')
    eng = LegacyEngine(a.port)
    assert eng.start() == '0'
    folder, name = put_fixture(shared, 'en_hello.wav')
    req = transcribe_req(folder, name, sid='u1task')
    msg = {'speechID': 'u1task', 'token': 'tokU', 'request': req, 'source': 'client', 'keepSource': False,
           'filePathRaw': None, 'origin': 'ghost', 'reply': qname + '.reply.ghost', 'created': time.time()}
    query(dbname, "INSERT INTO cluster_task (speech_id, token, origin_node, origin_token, message, state, attempts,"
                  " source, created_at, updated_at) VALUES ('u1task', 'tokU', 'ghost', 'deadlife', %s, 'queued', 0,"
                  " 'client', NOW(6), NOW(6) - INTERVAL 1 MINUTE)", (json.dumps(msg),))
    recs = a.wait_records(1)
    assert [r['data']['speechID'] for r in recs] == ['u1task'] and [r['speechID'] for r in eng.received] == ['u1task']
    crow = wait_for(lambda: (lambda r: r if r['state'] == 'final' else None)(cluster_rows(dbname)['u1task']), 30,
                    'the row final')
    assert crow['origin_node'] == 'u1' and crow['attempts'] == 1
    time.sleep(2)       # swept once: not published again
    assert len(a.records()) == 1 and len(eng.received) == 1
    eng.close()


def test_a_task_its_runner_s_paths_refuse_ends_there_once_instead_of_going_round(node, shared, dbname, qname):
    """Nodes whose allowed roots differ: the node that took the task refuses its paths. That is
    its end (result 7, one record, one final row), not a message sent back to the queue over and
    over."""
    a = remote_node(node, 'ra')                          # admits it; no engine: runs nothing
    b = remote_node(node, 'rb', roots='batch, data')     # runs tasks, but not from the shared folder
    eng = LegacyEngine(b.port)
    assert eng.start() == '0'
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca:
        ca.send(1002, transcribe_req(folder, name, sid='r1'))
        _, answer = ca.recv(60)
    assert answer['result'] == '7' and 'outside the allowed roots' in answer['message'], answer
    assert 'rb' in answer['message'], answer
    assert eng.received == []
    recs = b.wait_records(1)
    assert [(r['data']['speechID'], r['data']['result']) for r in recs] == [('r1', '7')] and a.records() == []
    rows = final_rows(dbname, 1)
    assert rows['r1']['node'] == 'rb' and rows['r1']['result'] == '7'
    crow = cluster_rows(dbname)['r1']
    assert (crow['state'], crow['run_node'], crow['attempts']) == ('final', 'rb', 1)
    # Nothing goes round: no delivery left in either queue, and rb decided the task once.
    view = wait_for(lambda: (lambda c: c if c.get('queueDepth') == 0 else None)(monitor(b, 'cluster')['cluster']),
                    15, 'the queue empty')
    assert view['counters'].get('refusedRuns', 0) == 1, view['counters']
    log = b.log_text()
    assert 'speechID=r1 from the cluster not taken here' not in log and log.count('speechID=r1 ended') == 1
    eng.close()


def test_a_node_that_cannot_write_records_takes_nothing_from_the_queue(tmpfs, node, shared, dbname, qname):
    """A full records disk: the node answers no more deliveries (prefetch 0) instead of taking each
    task and giving it back to the queue; the others run them. Its own held record follows once
    there is space again."""
    a = remote_node(node, 'fa', start=False)
    filler = fill(tmpfs(os.path.join(a.base, 'records'), '1m'))
    a.cli('db', 'init', check=True)
    a.start()
    wait_for(lambda: monitor(a, 'cluster')['cluster']['brokerUp'], 30, 'fa connected to the broker')
    ea = LegacyEngine(a.port)
    assert ea.start() == '0'
    b = remote_node(node, 'fb')         # no engine yet: it takes nothing
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca, Closing(b.client()) as cb:
        ca.send(1002, transcribe_req(folder, name, sid='f1'))
        wait_for(lambda: 'could not write the usage record of speechID=f1' in a.log_text(), 60, 'the failed record')
        wait_for(lambda: monitor(a, 'cluster')['cluster']['capacity'] == 0, 15, 'fa takes nothing more')
        # fa admits nothing now (result 3); a task admitted on fb waits in the queue, fa leaves it there.
        cb.send(1002, transcribe_req(folder, name, sid='f2'))
        wait_for(lambda: cluster_rows(dbname).get('f2'), 30, 'f2 entered')
        time.sleep(1)       # what fa would do with a delivery, it would do now
        assert cluster_rows(dbname)['f2']['state'] == 'queued'
        eb = LegacyEngine(b.port)
        assert eb.start() == '0'
        _, f2 = cb.recv(60)
        os.unlink(filler)
        _, f1 = ca.recv(60)
    answers = {'f1': f1, 'f2': f2}
    assert answers['f2']['result'] == '0' and [r['speechID'] for r in eb.received] == ['f2']
    assert [r['speechID'] for r in ea.received] == ['f1'] and answers['f1']['result'] == '0'
    assert 'speechID=f2 from the cluster not taken here' not in a.log_text()
    assert [r['data']['speechID'] for r in a.wait_records(1)] == ['f1']
    assert [r['data']['speechID'] for r in b.wait_records(1)] == ['f2']
    ea.close()
    eb.close()


def test_a_reload_keeps_the_running_cluster_and_db_sections_and_says_so(node, shared, dbname, qname):
    """[cluster] and [db] are read once, at start (the cluster thread, the db writer): a reload that
    changes them keeps the running values, node name included, and logs the keys that wait for a
    restart; the rest of the reload applies."""
    a = remote_node(node, 'hr')
    eng = LegacyEngine(a.port)
    assert eng.start() == '0'
    with open(a.ini) as f:
        text = f.read()
    with open(a.ini, 'w') as f:
        f.write(text.replace('node = hr', 'node = hr-renamed').replace('heartbeat_secs = 0.5', 'heartbeat_secs = 1')
                .replace('max_tasks = 100', 'max_tasks = 7'))
    assert a.cli('reload').returncode == 0
    wait_for(lambda: 'master: reload done' in a.log_text(), 30, 'the reload')
    log = a.log_text()
    assert 'reload: [db] node changed; that takes a restart' in log, log[-2000:]
    assert 'reload: [cluster] heartbeat_secs changed; that takes a restart' in log, log[-2000:]
    assert monitor(a)['queue']['maxTasks'] == 7          # the rest applied
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca:
        ca.send(1002, transcribe_req(folder, name, sid='h1'))
        _, answer = ca.recv(60)
    assert answer['result'] == '0'
    assert final_rows(dbname, 1)['h1']['node'] == 'hr'
    assert monitor(a, 'cluster')['cluster']['node'] == 'hr'
    assert cluster_rows(dbname)['h1']['run_node'] == 'hr'
    eng.close()


def test_a_second_node_with_a_live_node_s_name_stops_without_writing_anything(node, shared, dbname, qname):
    """app.ini copied to a new machine without changing [db] node: the newcomer sees the name's
    heartbeat still coming from another life, says so and stops; it never writes the heartbeat
    (the live node would look dead to the others) nor takes a task. A node killed and started again
    at once is not that: its earlier life's heartbeat stops coming (the other tests restart nodes)."""
    a = remote_node(node, 'dn')
    eng = LegacyEngine(a.port)
    assert eng.start() == '0'
    before = query(dbname, "SELECT token FROM cluster_node WHERE node = 'dn'")[0]['token']
    b = remote_node(node, 'dn', start=False)
    b.start()
    wait_for(lambda: not b.processes(), 30, 'the second "dn" stopped by itself')
    assert 'cluster: node name dn is in use by another live node' in b.log_text()
    assert 'broker connected' not in b.log_text()
    rows = query(dbname, "SELECT token, status FROM cluster_node WHERE node = 'dn'")
    assert [(r['token'], r['status']) for r in rows] == [(before, 'running')]
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(a.client()) as ca:
        ca.send(1002, transcribe_req(folder, name, sid='d1'))
        _, answer = ca.recv(60)
    assert answer['result'] == '0' and [r['speechID'] for r in eng.received] == ['d1']
    eng.close()


# ---------------------------------------------------------------- HTTP tasks through the queue

def http_node(node, shared, name, **opts):
    """A remote-engine node with its web process on and [http] upload_path unset: cluster mode puts
    the uploads at <shared_path>/uploads/<node>/, where the node that runs the task reads them."""
    opts.setdefault('engine', 'remote')
    opts.setdefault('workers', 1)
    d = node(name, start=False, http='true', ini_extra='shared_path = %s\n' % shared, **opts)
    with open(d.ini, encoding='utf-8') as f:
        text = f.read()
    with open(d.ini, 'w', encoding='utf-8') as f:
        f.write(text.replace('upload_path = data/uploads\n', ''))
    d.cli('db', 'init', check=True)
    d.start()
    d.url = 'http://127.0.0.1:%d' % d.http_port
    d.uploads = os.path.join(shared, 'uploads', name)
    wait_for(lambda: web_up(d), 30, '%s web process' % name)
    return d


def shared_records(shared, name):
    """The record lines node `name` wrote to <shared_path>/records/<name>/."""
    return records_in(sorted(glob.glob(os.path.join(shared, 'records', name, '*.json'))))


def web_up(d):
    try:
        return requests.get(d.url + '/healthz', timeout=2).status_code == 200
    except requests.RequestException:
        return False


def post_wav(d, sid, timeout=90):
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        return requests.post(d.url + '/v1/audio/transcriptions', data={'speechID': sid, 'response_format': 'json'},
                             files={'file': ('hello.wav', f, 'audio/wav')}, timeout=timeout)


def test_an_http_task_admitted_on_one_node_runs_on_another(node, shared, dbname, qname):
    a, b = http_node(node, shared, 'ha'), http_node(node, shared, 'hb')
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # No node has an engine yet: the task waits in the queue, and the web lists it as running.
        posted = pool.submit(post_wav, a, 'web1')
        wait_for(lambda: cluster_rows(dbname).get('web1'), 30, 'the cluster row')
        listed = requests.get(a.url + '/v1/tasks', timeout=10).json()['tasks']
        assert [t['speechID'] for t in listed] == ['web1'] and not listed[0]['done'], listed
        assert len(os.listdir(a.uploads)) == 1
        eng = LegacyEngine(b.port)          # only node hb can run it
        assert eng.start() == '0'
        resp = posted.result(90)
    assert resp.status_code == 200, resp.text
    assert resp.headers['X-Speech-ID'] == 'web1' and resp.json()['text'] == '안녕하세요 고객님, web1 통화입니다'
    assert [r['speechID'] for r in eng.received] == ['web1']
    recs = wait_for(lambda: shared_records(shared, 'hb'), 30, 'the record of hb')
    assert [(r['data']['speechID'], r['source']) for r in recs] == [('web1', 'http')]
    crow = cluster_rows(dbname)['web1']
    assert (crow['origin_node'], crow['run_node'], crow['state']) == ('ha', 'hb', 'final')
    # The origin's web removes the upload once the runner's records line came back; it shows the task.
    wait_for(lambda: os.listdir(a.uploads) == [], 10, 'the upload removed')
    task = requests.get(a.url + '/v1/tasks/web1', timeout=10).json()
    assert task['done'] and task['result'] == '0' and task['transcript'] == '안녕하세요 고객님, web1 통화입니다'
    # It is the runner's records line, timings and all, not one made up of the 2002 answer.
    assert (task['startTime'], task['endTime']) == (recs[0]['startTime'], recs[0]['endTime'])
    assert task['timings'] and len(task['timings']) == len(recs[0]['processInterval'])
    assert shared_records(shared, 'ha') == [] and len(shared_records(shared, 'hb')) == 1
    # Taken and run by the same node: its web hears of the end once (from the record, not the reply too).
    resp = post_wav(b, 'web2')
    assert resp.status_code == 200 and resp.json()['text'] == '안녕하세요 고객님, web2 통화입니다', resp.text
    wait_for(lambda: os.listdir(b.uploads) == [], 10, 'the upload removed')
    crow = wait_for(lambda: (lambda r: r if r['state'] == 'final' else None)(cluster_rows(dbname)['web2']), 10,
                    'the final cluster row')
    assert (crow['origin_node'], crow['run_node']) == ('hb', 'hb')
    wait_for(lambda: monitor(b, 'cluster')['cluster']['waiting'] == 0, 10, 'the reply of web2')
    listed = requests.get(b.url + '/v1/tasks', timeout=10).json()['tasks']
    assert [t['speechID'] for t in listed].count('web2') == 1, listed
    eng.close()


def test_a_restarted_web_process_keeps_the_upload_of_a_task_waiting_for_the_cluster(node, shared, dbname, qname):
    a, b = http_node(node, shared, 'wa'), http_node(node, shared, 'wb')
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        posted = pool.submit(post_wav, a, 'kept1')
        wait_for(lambda: cluster_rows(dbname).get('kept1'), 30, 'the cluster row')
        old = web_process(a)
        old.kill()
        with pytest.raises(requests.RequestException):
            posted.result(30)
    wait_for(lambda: web_process(a) is not None and web_process(a).pid != old.pid and web_up(a), 30,
             'a new web process')
    assert len(os.listdir(a.uploads)) == 1          # its task waits in the queue: kept
    eng = LegacyEngine(b.port)
    assert eng.start() == '0'
    recs = wait_for(lambda: shared_records(shared, 'wb'), 30, 'the record of wb')
    assert recs[0]['data']['speechID'] == 'kept1' and recs[0]['data']['result'] == '0'
    wait_for(lambda: os.listdir(a.uploads) == [], 15, 'the upload removed once the task ended')
    eng.close()


def test_http_tasks_refused_or_unanswered_by_the_cluster_get_their_http_status(node, shared, dbname, qname):
    a, b = http_node(node, shared, 'ra', timeout=2, graceful=2), http_node(node, shared, 'rb', graceful=2)
    # The speechID waits in the queue, admitted by the other node: refused across the cluster.
    folder, name = put_fixture(shared, 'en_hello.wav')
    with Closing(b.client()) as cb:
        cb.send(1002, transcribe_req(folder, name, sid='dup1'))
        wait_for(lambda: cluster_rows(dbname).get('dup1'), 30, 'the cluster row')
        resp = post_wav(a, 'dup1')
        assert resp.status_code == 409, resp.text
        assert resp.json()['error']['code'] == '1' and 'in progress in the cluster' in resp.json()['error']['message']
        # No engine anywhere: no answer within session_timeout_secs.
        resp = post_wav(a, 'late1')
        assert resp.status_code == 504, resp.text
        assert resp.json()['error']['code'] == '5'
        wait_for(lambda: os.listdir(a.uploads) == [], 10, 'the uploads removed')


def test_http_tasks_through_haproxy_end_once_each_through_the_queue(make_cluster):
    c = make_cluster(n=2, engine='remote', http=True)
    for n in c.nodes:
        # HAProxy counts a server up until its checks fail: the web processes themselves are asked.
        n.url = 'http://127.0.0.1:%d' % n.http_port
        wait_for(lambda: web_up(n), 30, '%s web process' % n.name)
    sids = ['hp%d' % i for i in range(4)]
    for sid in sids:
        with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
            resp = requests.post('http://127.0.0.1:%d/v1/audio/transcriptions' % c.haproxy.http_port,
                                 data={'speechID': sid}, files={'file': ('a.wav', f, 'audio/wav')}, timeout=60)
        assert resp.status_code == 200 and resp.json()['text'] == '안녕하세요 고객님, %s 통화입니다' % sid, resp.text
    c.wait_exactly_once(sids, timeout=60)
    assert sorted(c.cluster_rows()) == sids       # each went through the cluster's queue
    wait_for(lambda: all(os.listdir(os.path.join(c.shared, 'uploads', n.name)) == [] for n in c.nodes), 10,
             'the uploads removed')
