"""End-to-end tests of the real daemon over real sockets: transcription with
pocketsphinx, framing, admission, Monitor, timeouts, disconnects, worker deaths,
signals and lifecycle. After each, records equal accepted tasks."""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, expected_texts, long_wav, title_of, transcribe_req, wait_for
from helpers import assert_records_match, monitor
from _packet import encode

TEXTS = expected_texts()


# ------------------------------------------------------------------ transcription

def test_transcribes_fixtures_in_flight_on_one_connection(daemon):
    names = ['en_hello.wav', 'en_morning.wav', 'en_email.wav', 'en_cancel.wav', 'en_payment.wav']
    c = daemon.client()
    for i, name in enumerate(names):
        folder, fname = daemon.fixture(name)
        c.send(1002, transcribe_req(folder, fname, sid='t%d' % i))
    answers = {body['speechID']: body for _, body in c.recv_n(len(names), timeout=120)}
    for i, name in enumerate(names):
        body = answers['t%d' % i]
        assert body['result'] == '0', body
        assert body['state'] == 'DONE'
        assert body['transcript'] == TEXTS[name]
        assert body['transcipt'] == TEXTS[name]
        assert body['channels'] == [{'channel': 'A', 'transcript': TEXTS[name]}]
        assert body['duration'] > 0.5
    recs = assert_records_match(daemon, len(names))
    rec = next(r for r in recs if r['data']['speechID'] == 't0')
    assert rec['data'] == {'speechID': 't0', 'transcript': TEXTS['en_hello.wav'], 'result': '0'}
    assert rec['state'] == 'DONE' and rec['source'] == 'client' and rec['worker'] in (1, 2)
    marks = [m.split(' < ')[1] for m in rec['processInterval']]
    assert marks == ['TRANSCRIBE_START', 'WORKER_PUT', 'WORKER_GET', 'TRANSCRIBE_END']
    times = [float(m.split(' < ')[0]) for m in rec['processInterval']]
    assert times == sorted(times)
    time.strptime(rec['startTime'][:19], '%Y.%m.%d %H:%M:%S')


def test_stereo_and_mp3_and_generated_speech_id(daemon):
    c = daemon.client()
    folder, name = daemon.fixture('stereo_call.wav')
    c.send(1002, transcribe_req(folder, name))       # no speechID: the daemon makes one
    _, body = c.recv(120)
    assert body['result'] == '0', body
    assert len(body['speechID']) == 22 and body['speechID'][8] == '_'
    assert body['transcript'] == TEXTS['stereo_call.wav']['transcript']
    assert [ch['channel'] for ch in body['channels']] == ['A', 'B']
    folder, name = daemon.fixture('fmt_mp3.mp3')
    c.send(1002, transcribe_req(folder, name, sid='mp3'))
    _, body = c.recv(120)
    assert body['result'] == '0' and body['transcript'] == TEXTS['fmt_mp3.mp3']


def test_frames_split_byte_by_byte_and_merged(daemon):
    folder, a = daemon.fixture('en_hello.wav')
    _, b = daemon.fixture('en_morning.wav')
    stream = encode(1002, transcribe_req(folder, a, sid='split-a')) + encode(1003, {'type': 'task'}) \
        + encode(1002, transcribe_req(folder, b, sid='split-b'))
    c = daemon.client()
    for i in range(len(stream)):
        c.send_raw(stream[i:i + 1])
    got = c.recv_n(3, timeout=120)
    assert [p for p, _ in got].count(2003) == 1
    results = {b['speechID']: b['transcript'] for p, b in got if p == 2002}
    assert results == {'split-a': TEXTS['en_hello.wav'], 'split-b': TEXTS['en_morning.wav']}
    # merged: many frames in one segment
    c.send_raw(encode(1003, {'type': 'cpu'}) * 20)
    got = c.recv_n(20, timeout=10)
    assert all(p == 2003 and 'cpu' in b for p, b in got)


def test_monitor_while_workers_busy(make_daemon, tmp_path):
    d = make_daemon(workers=2).start()
    c = d.client()
    for i in range(4):
        long_wav(os.path.join(d.data, 'long%d.wav' % i), 8)
        c.send(1002, transcribe_req(d.data, 'long%d.wav' % i, sid='busy%d' % i))
    body = wait_for(lambda: (lambda m: m if sum(1 for w in m['workers'] if w['speechID']) == 2 else None)(monitor(d)),
                    30, 'both workers busy')
    assert body['version'] == '2.0'
    assert body['engine']['sttengine'] is True
    assert {t['speechID'] for t in body['task']} == {'busy0', 'busy1', 'busy2', 'busy3'}
    assert {t['state'] for t in body['task']} <= {'INIT', 'CONVERT', 'RECOGNIZE'}
    assert body['queue']['pending'] == 2
    assert set(body['cpu']) == {'user', 'system', 'idle', 'nice'}
    assert body['memory']['total'] > 0 and body['memory']['totalB2H'][-1] in 'KMGT'
    assert body['disk'] and {'device', 'mount', 'type', 'total', 'used', 'free', 'percent'} <= set(body['disk'][0])
    only = monitor(d, 'memory')
    assert set(only) == {'version', 'memory'}
    c.recv_n(4, timeout=180)
    assert_records_match(d, 4)


# ------------------------------------------------------------------ bad input

def test_bad_requests_answered_with_7_connection_stays_open(daemon):
    c = daemon.client()
    folder, name = daemon.fixture('en_hello.wav')
    cases = [
        b'{not json',
        '"a string"'.encode(),
        b'\xff\xfe',
        {'speechID': 'x', 'fileID': 'a.wav'},                       # filePath missing
        {'speechID': 'x', 'filePath': folder},                      # no fileID nor fileName
        {'speechID': 'x', 'filePath': folder, 'fileID': 5},         # wrong type
        {'speechID': '../etc', 'filePath': folder, 'fileID': name},  # bad speechID
        {'speechID': 'a' * 65, 'filePath': folder, 'fileID': name},
        {'speechID': 'x', 'filePath': '/etc', 'fileID': 'passwd'},  # outside the roots
        {'speechID': 'x', 'filePath': folder, 'fileID': '../../../../etc/passwd'},
        {'speechID': 'x', 'filePath': 'relative/dir', 'fileID': name},
        {'speechID': 'x', 'filePath': folder, 'fileID': name, 'audioPath': '/tmp'},
        {'speechID': 'x', 'filePath': folder, 'fileID': 'a\x00b.wav'},
    ]
    for body in cases:
        c.send(1002, body)
        ptype, answer = c.recv(10)
        assert ptype == 2002
        assert answer['result'] == '7', (body, answer)
        assert answer['state'] == 'NONE'
        assert answer['message']
    c.send(1002, transcribe_req(folder, name, sid='after-bad'))
    _, answer = c.recv(60)
    assert answer['result'] == '0'
    log = daemon.log_text()
    assert 'rejected with 7' in log and 'outside the allowed roots' in log
    assert_records_match(daemon, 1)


def test_unknown_type_answered_with_2(daemon):
    c = daemon.client()
    c.send(1077, {'x': 1})
    ptype, answer = c.recv(10)
    assert ptype == 2077 and answer['result'] == '2' and '1077' in answer['message']
    c.send(1003, {'type': 'engine'})
    assert c.recv(10)[0] == 2003


@pytest.mark.parametrize('raw', [b'1002    12a4{}', b'10x2       2{}', b'1002 -000002{}', b'1002      1 2{}'])
def test_framing_error_answers_7_and_closes(daemon, raw):
    c = daemon.client()
    c.send_raw(raw)
    if raw.startswith(b'1002'):
        ptype, answer = c.recv(10)
        assert ptype == 2002 and answer['result'] == '7' and 'framing' in answer['message']
    assert c.closed_by_peer(10)
    assert 'framing error' in daemon.log_text()


def test_oversize_and_huge_announced_length(make_daemon):
    d = make_daemon().start()
    c = d.client()
    c.send_raw(b'100299999999')          # 99,999,999 bytes announced, never sent
    ptype, answer = c.recv(10)
    assert ptype == 2002 and answer['result'] == '7' and 'max_packet_bytes' in answer['message']
    assert c.closed_by_peer(10)


def test_missing_undecodable_empty_and_header_only_files(daemon):
    import wave
    c = daemon.client()
    with open(os.path.join(daemon.data, 'junk.wav'), 'wb') as f:
        f.write(os.urandom(5000))
    open(os.path.join(daemon.data, 'empty.wav'), 'wb').close()
    with wave.open(os.path.join(daemon.data, 'header.wav'), 'wb') as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
    expect = {'nosuch': ('4', 'NOFILE_ID'), 'junk': ('9', 'UNKNOWN_FORMAT'),
              'empty': ('9', 'UNKNOWN_FORMAT'), 'header': ('9', 'UNKNOWN_FORMAT')}
    for sid in expect:
        c.send(1002, transcribe_req(daemon.data, sid + '.wav', sid=sid))
    answers = {b['speechID']: b for _, b in c.recv_n(len(expect), timeout=60)}
    for sid, (result, state) in expect.items():
        assert (answers[sid]['result'], answers[sid]['state']) == (result, state), answers[sid]
        assert answers[sid]['message']
    assert 'fileID not found' in answers['nosuch']['message']
    # the workers survived: nothing was respawned and a good file still works
    pids = {w.pid for w in daemon.workers()}
    folder, name = daemon.fixture('en_morning.wav')
    c.send(1002, transcribe_req(folder, name, sid='still-ok'))
    assert c.recv(60)[1]['transcript'] == TEXTS['en_morning.wav']
    assert {w.pid for w in daemon.workers()} == pids
    assert_records_match(daemon, 5)


def test_duplicate_speech_id_in_progress_gets_1(make_daemon):
    d = make_daemon(workers=1).start()
    long_wav(os.path.join(d.data, 'long.wav'), 6)
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='dup'))
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='dup'))
    ptype, answer = c.recv(10)
    assert answer['result'] == '1' and answer['speechID'] == 'dup'
    assert c.recv(60)[1]['result'] == '0'
    assert_records_match(d, 1)


def test_max_tasks_exactly(make_daemon):
    d = make_daemon(workers=1, max_tasks=3).start()
    long_wav(os.path.join(d.data, 'long.wav'), 5)
    c = d.client()
    for i in range(5):
        c.send(1002, transcribe_req(d.data, 'long.wav', sid='m%d' % i))
    rejected = [c.recv(10)[1] for _ in range(2)]
    assert sorted(r['speechID'] for r in rejected) == ['m3', 'm4']
    assert all(r['result'] == '6' for r in rejected)
    done = c.recv_n(3, timeout=120)
    assert sorted(b['speechID'] for _, b in done) == ['m0', 'm1', 'm2']
    assert all(b['result'] == '0' for _, b in done)
    assert_records_match(d, 3)


# ------------------------------------------------------------------ timeouts, disconnects, deaths

def test_task_timeout_gives_5_and_worker_is_replaced(make_daemon):
    d = make_daemon(workers=1, timeout=2).start()
    long_wav(os.path.join(d.data, 'long.wav'), 30)
    old = {w.pid for w in d.workers()}
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='slow'))
    _, answer = c.recv(20)
    assert answer['result'] == '5' and answer['state'] == 'TIMEOUT'
    wait_for(lambda: d.workers() and {w.pid for w in d.workers()} != old, 20, 'a new worker')
    folder, name = d.fixture('en_morning.wav')
    c.send(1002, transcribe_req(folder, name, sid='after'))
    assert c.recv(30)[1]['result'] == '0'
    recs = assert_records_match(d, 2)
    assert [r['data']['result'] for r in recs if r['data']['speechID'] == 'slow'] == ['5']


def test_partial_frame_held_too_long_is_closed(make_daemon):
    d = make_daemon(timeout=1).start()
    c = d.client()
    c.send_raw(b'1003     ')          # half a header, then nothing
    assert c.closed_by_peer(10)
    assert 'incomplete frame' in d.log_text()


def test_client_disconnect_records_result_8(make_daemon):
    d = make_daemon(workers=1).start()
    long_wav(os.path.join(d.data, 'long.wav'), 4)
    c = d.client()
    for i in range(3):
        c.send(1002, transcribe_req(d.data, 'long.wav', sid='gone%d' % i))
    time.sleep(0.2)
    c.close()
    recs = d.wait_records(3, timeout=120)
    assert sorted(r['data']['result'] for r in recs) == ['8', '8', '8']
    assert all(r['state'] == 'DONE' for r in recs)
    assert_records_match(d, 3)


def _busy_worker(d, sid):
    body = wait_for(lambda: next((w for w in monitor(d)['workers'] if w['speechID'] == sid), None),
                    30, 'a worker on %s' % sid)
    return body['pid']


def test_worker_sigkill_mid_task_is_retried_once(make_daemon):
    d = make_daemon(workers=2).start()
    long_wav(os.path.join(d.data, 'long.wav'), 6)
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='k1'))
    pid = _busy_worker(d, 'k1')
    os.kill(pid, signal.SIGKILL)
    _, answer = c.recv(120)
    assert answer['result'] == '0' and answer['speechID'] == 'k1'
    wait_for(lambda: len(d.workers()) == 2 and pid not in {w.pid for w in d.workers()}, 20, 'respawn')
    assert 'retrying on another worker' in d.log_text()
    assert_records_match(d, 1)


def test_worker_killed_twice_gives_9(make_daemon):
    d = make_daemon(workers=2).start()
    long_wav(os.path.join(d.data, 'long.wav'), 10)
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='k2'))
    first = _busy_worker(d, 'k2')
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: next((w['pid'] for w in monitor(d)['workers']
                                    if w['speechID'] == 'k2' and w['pid'] != first), None), 30, 'retry')
    os.kill(second, signal.SIGKILL)
    _, answer = c.recv(30)
    assert answer['result'] == '9' and answer['state'] == 'ERROR' and 'signal 9' in answer['message']
    wait_for(lambda: len(d.workers()) == 2, 20, 'respawn')
    assert_records_match(d, 1)


def test_sigterm_with_tasks_in_flight(make_daemon):
    d = make_daemon(workers=1, graceful=30).start()
    long_wav(os.path.join(d.data, 'long.wav'), 4)
    c = d.client()
    for i in range(3):
        c.send(1002, transcribe_req(d.data, 'long.wav', sid='term%d' % i))
    _busy_worker(d, 'term0')
    procs = d.processes()
    os.kill(d.pid, signal.SIGTERM)
    answers = {b['speechID']: b for _, b in c.recv_n(3, timeout=60)}
    assert answers['term0']['result'] == '0'                 # running: finished
    assert answers['term1']['result'] == '3' and answers['term2']['result'] == '3'   # queued: 3
    gone, alive = psutil.wait_procs(procs, timeout=40)
    assert not alive
    recs = d.records()
    assert sorted(r['data']['speechID'] for r in recs) == ['term0', 'term1', 'term2']
    assert 'Program End' in d.psout()


def test_sigterm_graceful_timeout_ends_running_with_3(make_daemon):
    d = make_daemon(workers=1, graceful=1).start()
    long_wav(os.path.join(d.data, 'long.wav'), 30)
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='cut'))
    _busy_worker(d, 'cut')
    procs = d.processes()
    t = time.monotonic()
    os.kill(d.pid, signal.SIGTERM)
    _, answer = c.recv(20)
    assert answer['result'] == '3'
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive
    assert time.monotonic() - t < 15
    assert [r['data']['result'] for r in d.records()] == ['3']


# ------------------------------------------------------------------ lifecycle

def test_lifecycle_start_status_stop(make_daemon):
    d = make_daemon(workers=2)
    r = d.cli('start')
    assert r.returncode == 0 and 'started' in r.stdout
    r = d.cli('start')
    assert r.returncode == 1 and 'already running' in r.stdout
    r = d.cli('status')
    assert r.returncode == 0
    roles = [line.split()[1] for line in r.stdout.splitlines()[1:]]
    assert roles.count('master') == 1 and roles.count('worker') == 2
    titles = sorted(title_of(p) for p in d.workers())
    assert titles == ['svcmgr: worker 1', 'svcmgr: worker 2']
    psout = d.psout()
    assert '================[ Program Start ]====' in psout
    assert 'Service Manager Daemon started with pid %d' % d.pid in psout
    procs = d.processes()
    r = d.cli('stop')
    assert r.returncode == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert 'Program End' in d.psout()
    assert d.cli('status').returncode == 3


def test_stale_pidfile_is_replaced(make_daemon):
    d = make_daemon(workers=1)
    with open(os.path.join(d.base, 'svcmgr.pid'), 'w') as f:
        f.write('%d\n' % os.getpid())       # a live process that is not svcmgr
    r = d.cli('start')
    assert r.returncode == 0, r.stderr
    assert d.pid != os.getpid()


def test_bad_app_ini_stops_start_with_status_2(make_daemon):
    d = make_daemon()
    d.write_ini('bogus_section_key = 1\n[nosuch]\nx = 1\n')
    with open(d.ini) as f:
        text = f.read().replace('max_tasks = 100', 'max_tasks = 0').replace('port = %d' % d.port, 'port = abc')
    with open(d.ini, 'w') as f:
        f.write(text)
    r = d.cli('start')
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any('[setting] max_tasks' in line for line in lines)
    assert any('[server] port' in line for line in lines)
    assert any('[nosuch]' in line for line in lines)
    assert d.pid is None
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '-c', os.path.join(d.base, 'nope.ini'),
                        'start'], capture_output=True, text=True)
    assert r.returncode == 2 and 'nope.ini' in r.stderr


def test_port_in_use_is_a_clear_error(make_daemon):
    d = make_daemon()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(('127.0.0.1', d.port))
        s.listen()
        r = d.cli('start')
    assert r.returncode == 1 and 'cannot listen' in r.stderr


def test_cli_transcribe_and_monitor(daemon):
    folder, name = daemon.fixture('en_hello.wav')
    r = daemon.cli('transcribe', '--keep', os.path.join(folder, name))
    assert r.returncode == 0, r.stderr
    assert TEXTS['en_hello.wav'] in r.stdout
    assert os.path.exists(os.path.join(folder, name))
    r = daemon.cli('monitor')
    assert r.returncode == 0 and '"version": "2.0"' in r.stdout


def test_sighup_reloads_app_ini_and_restarts_workers(make_daemon):
    d = make_daemon(workers=1).start()
    old = {w.pid for w in d.workers()}
    c = d.client()                              # a connection open across the reload
    d.opts['workers'] = 2
    d.write_ini()
    assert d.cli('reload').returncode == 0
    wait_for(lambda: len(d.workers()) == 2 and not ({w.pid for w in d.workers()} & old), 30, 'two new workers')
    folder, name = d.fixture('en_morning.wav')
    c.send(1002, transcribe_req(folder, name, sid='after-hup'))
    assert c.recv(60)[1]['result'] == '0'
    # a bad app.ini on reload is refused and logged; the daemon keeps running as it was
    with open(d.ini, 'a') as f:
        f.write('[setting]\nmax_tasks = -1\n')
    pids = {w.pid for w in d.workers()}
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: 'reload refused' in d.log_text(), 10, 'reload refused')
    assert {w.pid for w in d.workers()} == pids
    c.send(1003, {'type': 'engine'})
    assert c.recv(10)[0] == 2003


def test_sigusr1_reopens_log_files(make_daemon):
    d = make_daemon(workers=1).start()
    log_path = os.path.join(d.base, 'logs', 'app.log')
    os.rename(log_path, log_path + '.1')
    os.kill(d.pid, signal.SIGUSR1)
    wait_for(lambda: os.path.exists(log_path) and 'log files reopened' in d.log_text(), 10, 'a new app.log')


def test_run_in_foreground(make_daemon):
    d = make_daemon(workers=1)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '-c', d.ini, 'run'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: d.pid == proc.pid and monitor(d), 60, 'the foreground daemon')
        folder, name = d.fixture('en_morning.wav')
        c = d.client()
        c.send(1002, transcribe_req(folder, name, sid='fg'))
        assert c.recv(60)[1]['transcript'] == TEXTS['en_morning.wav']
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not os.path.exists(os.path.join(d.base, 'svcmgr.pid'))
        assert 'Program End' in d.psout()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_master_is_recognised_whatever_its_argv(tmp_path):
    """./start.sh runs `python svcmgr.py start`: a title longer than that argv is read back
    by psutil split at spaces, and the pidfile check must still know the master."""
    import _daemon
    (tmp_path / 's.py').write_text('import os, setproctitle, time\n'
                                   'setproctitle.setproctitle("svcmgr: master " + os.environ["T"])\n'
                                   'print("ready", flush=True)\ntime.sleep(60)\n')
    # a short argv, as start.sh's, and a title longer than it
    proc = subprocess.Popen([sys.executable, 's.py'], cwd=str(tmp_path), stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, T='/a/rather/long/path/to/the/app.ini'))
    try:
        assert proc.stdout.readline().strip() == 'ready'
        assert title_of(psutil.Process(proc.pid)) == 'svcmgr: master /a/rather/long/path/to/the/app.ini'
        assert _daemon.is_master(proc.pid)
        assert not _daemon.is_master(os.getpid())
    finally:
        proc.kill()
        proc.wait()
