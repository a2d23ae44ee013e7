"""Worker recycling (_speed.py, _pool.py): a worker leaves after max_tasks_per_worker tasks
or once its private memory passes max_worker_memory_mb, a fresh one takes its number at
once, and every task is answered and recorded once. Real daemon, real engine."""
import re

import _speed
from conftest import transcribe_req, wait_for


def start_with(make_daemon, **setting):
    d = make_daemon(workers=1)
    with open(d.ini) as f:
        text = f.read()
    lines = ''.join('%s = %s\n' % kv for kv in setting.items())
    with open(d.ini, 'w') as f:
        f.write(text.replace('heartbeat_secs = 0.5\n', 'heartbeat_secs = 0.5\n' + lines))
    return d.start()


def run_tasks(d, n):
    folder, name = d.fixture('en_hello.wav')
    c = d.client()
    for i in range(n):
        c.send(1002, transcribe_req(folder, name, sid='recycle%d' % i))
    answers = c.recv_n(n, timeout=120)
    c.close()
    assert [body['result'] for _, body in answers] == ['0'] * n
    assert all(body['transcript'] == 'hello customer how can i help you' for _, body in answers)
    records = d.wait_records(n)
    assert sorted(r['data']['speechID'] for r in records) == sorted('recycle%d' % i for i in range(n))


def started_pids(d):
    return re.findall(r'worker 1 started with pid (\d+)', d.log_text())


def test_worker_recycled_after_max_tasks(make_daemon):
    d = start_with(make_daemon, max_tasks_per_worker=2, max_worker_memory_mb=0)
    run_tasks(d, 5)
    log = d.log_text()
    assert log.count('recycled after 2 tasks (max_tasks_per_worker); starting a fresh one') == 2
    # Started at boot, then after tasks 2 and 4: three different processes, no backoff.
    pids = wait_for(lambda: len(set(started_pids(d))) == 3 and started_pids(d), 30, 'three workers')
    assert len(set(pids)) == 3
    assert 'died' not in log and 'failed within' not in log
    wait_for(lambda: len(d.workers()) == 1, 30, 'one worker left')


def test_worker_recycled_past_memory_limit(make_daemon):
    d = start_with(make_daemon, max_tasks_per_worker=0, max_worker_memory_mb=1)
    run_tasks(d, 3)
    assert d.log_text().count('private memory (max_worker_memory_mb = 1); starting a fresh one') == 3
    wait_for(lambda: len(set(started_pids(d))) == 4, 30, 'four workers')


def test_private_memory_is_read():
    mb = _speed.private_mb()
    assert mb is not None and 1 < mb < 4096
