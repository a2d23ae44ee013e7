"""The multi-node harness itself (tests/cluster.py), with nodes in single mode: HAProxy spreads
1002 clients over three real nodes and takes a SIGKILLed one out by its health check, the
broker link cuts and comes back, and the counting finds a duplicate record."""
import socket
import time
import urllib.request

from conftest import wait_for

AMQP_HEADER = b'AMQP\x00\x00\x09\x01'


def run_clients(c, sids):
    """One client connection through HAProxy per speechID, all open at once; their answers."""
    clients = []
    for sid in sids:
        cl = c.client(timeout=60)
        cl.send(1002, c.request(sid))
        clients.append(cl)
    answers = {}
    for cl in clients:
        _, body = cl.recv(60)
        answers[body['speechID']] = body
        cl.close()
    return answers


def test_haproxy_balances_three_nodes_and_takes_a_killed_one_out(make_cluster):
    c = make_cluster(n=3, cluster_mode=False, engine='remote', http=True)
    first = ['h%02d' % i for i in range(30)]
    answers = run_clients(c, first)
    assert {sid: a['result'] for sid, a in answers.items()} == {sid: '0' for sid in first}
    c.wait_exactly_once(first, timeout=60)
    per_node = {n.name: len(n.records()) for n in c.nodes}
    assert sum(per_node.values()) == 30 and min(per_node.values()) >= 5, per_node   # round robin
    for _ in range(3):
        with urllib.request.urlopen('http://127.0.0.1:%d/healthz' % c.haproxy.http_port, timeout=10) as r:
            assert r.status == 200

    c.kill(1)
    c.haproxy.wait_state('node1', 'DOWN', timeout=10)
    c.haproxy.wait_state('node1', 'DOWN', timeout=10, backend='http_nodes')
    second = ['k%02d' % i for i in range(30)]
    answers = run_clients(c, second)
    assert {a['result'] for a in answers.values()} == {'0'}
    c.wait_exactly_once(first + second, timeout=60)
    assert len(c.nodes[1].records()) == per_node['node1']       # nothing went to the dead node

    c.restart(1)
    c.haproxy.wait_state('node1', 'UP', timeout=20)
    third = ['r%02d' % i for i in range(9)]
    assert {a['result'] for a in run_clients(c, third).values()} == {'0'}
    wait_for(lambda: len(c.nodes[1].records()) > per_node['node1'], 30, 'the restarted node to take tasks')
    c.wait_exactly_once(first + second + third, timeout=60)

    # The counting sees a task recorded twice.
    path = c.nodes[0].record_files()[0]
    with open(path, encoding='utf-8') as f:
        line = f.readline()
    with open(path, 'a', encoding='utf-8') as f:
        f.write(line)
    problems = c.exactly_once_problems(first + second + third)
    assert len(problems) == 1 and problems[0].endswith(': 2 records'), problems


def test_broker_link_cuts_for_a_while_then_comes_back(tmp_path):
    from cluster import BrokerLink
    link = BrokerLink()
    try:
        s = socket.create_connection(('127.0.0.1', link.port), 5)
        s.sendall(AMQP_HEADER)
        s.settimeout(5)
        assert s.recv(1)[:1] == b'\x01'           # RabbitMQ's Connection.Start: a method frame
        t0 = time.monotonic()
        link.cut_for(1.5)
        assert _closed(s), 'the cut left an open connection open'
        s.close()
        try:
            socket.create_connection(('127.0.0.1', link.port), 1).close()
            refused = False
        except OSError:
            refused = True
        assert refused or time.monotonic() - t0 >= 1.5
        s2 = wait_for(lambda: _connect(link.port), 10, 'the link to come back')
        assert time.monotonic() - t0 >= 1.4
        s2.sendall(AMQP_HEADER)
        s2.settimeout(5)
        assert s2.recv(1) == b'\x01'
        s2.close()
    finally:
        link.close()


def _closed(sock):
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass                 # the rest of Connection.Start, already in flight
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _connect(port):
    try:
        return socket.create_connection(('127.0.0.1', port), 1)
    except OSError:
        return None

