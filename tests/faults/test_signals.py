"""Signals under load against the real daemon: the master SIGKILLed, SIGHUP with
tasks in flight on open connections, SIGTERM finishing running tasks."""
import os
import signal
import threading

import psutil

from conftest import expected_texts, long_wav, transcribe_req, wait_for
from helpers import assert_records_match, monitor

TEXTS = expected_texts()


def test_master_sigkill_children_exit_and_start_cleans_up(make_daemon):
    d = make_daemon(workers=2).start()
    long_wav(os.path.join(d.data, 'long.wav'), 6)
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='orphan'))
    wait_for(lambda: any(w['speechID'] for w in monitor(d)['workers']), 30, 'a busy worker')
    children = d.processes()[1:]
    assert children
    os.kill(d.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, 'children outlived the master: %s' % alive
    assert c.closed_by_peer(5)
    r = d.cli('start')                 # the pidfile names a dead process: replaced
    assert r.returncode == 0, r.stderr
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='after-kill'))
    assert c.recv(60)[1]['transcript'] == TEXTS['en_morning.wav']


def test_sighup_under_load_drops_no_connection(make_daemon):
    d = make_daemon(workers=2, max_tasks=200).start()
    folder, name = d.fixture('en_morning.wav')
    clients = [d.client() for _ in range(4)]
    n_each = 6
    results = {}

    def run(i, c):
        for j in range(n_each):
            c.send(1002, transcribe_req(folder, name, sid='hup%d_%d' % (i, j)))
        results[i] = [b for _, b in c.recv_n(n_each, timeout=240)]
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    wait_for(lambda: monitor(d)['counters'].get('result_0', 0) >= 2, 60, 'some tasks done')
    old = {w.pid for w in d.workers()}
    os.kill(d.pid, signal.SIGHUP)
    for t in threads:
        t.join(300)
    assert len(results) == 4
    for answers in results.values():
        assert [b['result'] for b in answers] == ['0'] * n_each
    assert not ({w.pid for w in d.workers()} & old)        # workers were replaced gracefully
    assert_records_match(d, 4 * n_each)


def test_sigterm_under_load_finishes_running_tasks_within_graceful_timeout(make_daemon):
    d = make_daemon(workers=2, graceful=60, max_tasks=200).start()
    folder, name = d.fixture('en_hello.wav')
    c = d.client()
    for i in range(20):
        c.send(1002, transcribe_req(folder, name, sid='t%02d' % i))
    wait_for(lambda: sum(1 for w in monitor(d)['workers'] if w['speechID']) == 2, 30, 'both busy')
    running = {w['speechID'] for w in monitor(d)['workers'] if w['speechID']}
    procs = d.processes()
    os.kill(d.pid, signal.SIGTERM)
    answers = {b['speechID']: b for _, b in c.recv_n(20, timeout=120)}
    for sid in running:
        assert answers[sid]['result'] == '0', answers[sid]
    assert {b['result'] for b in answers.values()} <= {'0', '3'}
    gone, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive
    recs = d.records()
    assert sorted(r['data']['speechID'] for r in recs) == sorted(answers)
