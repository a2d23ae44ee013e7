"""Load with chaos against the real daemon: 2,000 tasks from 20 client connections
plus 200 dropped files, a random worker SIGKILLed every 2 s, the database cut for
30 s. Every accepted task must end in exactly one record, one final database row
and one delivered webhook; no client waits past its timeout; nothing is left
running after stop.

The STT engine here is the scripted 1.0 engine (tests/legacy_engine.py), so the
load is the daemon's own work: admission, PyAV conversion in the workers,
supervision, the 3001/4001 round trips and every sink."""
import http.server
import json
import os
import random
import signal
import socketserver
import threading
import time
import wave

import psutil

from conftest import transcribe_req, wait_for
from legacy_engine import LegacyEngine
from helpers import Proxy, db_section, monitor, query

CLIENTS, PER_CLIENT, DROPPED = 20, 100, 200
TIMEOUT = 120


class Receiver(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self):
        self.deliveries = []
        self.lock = threading.Lock()
        super().__init__(('127.0.0.1', 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        with self.server.lock:
            self.server.deliveries.append((self.headers['webhook-id'], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def tiny_wav(path, secs=0.2):
    with wave.open(path, 'wb') as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b'\x10\x00\xf0\xff' * int(4000 * secs))


def test_load_with_chaos_loses_nothing(make_daemon, dbname):
    proxy = Proxy()
    receiver = Receiver()
    d = make_daemon(engine='remote', workers=2, max_tasks=5000, timeout=TIMEOUT, mp3='false',
                    engine_slots=2, engine_concurrency=8, source_after='keep')
    with open(d.ini) as f:
        text = f.read().replace('scan_enabled = false', 'scan_enabled = true')
    with open(d.ini, 'w') as f:
        f.write(text + db_section(dbname, proxy.port) +
                '[webhook]\nurl = http://127.0.0.1:%d/hook\nbackoff_base_secs = 0.2\nbackoff_max_secs = 2\n'
                'rescan_secs = 0.5\n' % receiver.server_address[1])
    d.cli('db', 'init', check=True)
    d.start()
    engines = [LegacyEngine(d.port), LegacyEngine(d.port)]
    assert [e.start() for e in engines] == ['0', '0']
    tiny_wav(os.path.join(d.data, 'call.wav'))

    stop_killing = threading.Event()
    kills = []

    def killer():
        rnd = random.Random(7)
        while not stop_killing.wait(2.0):
            workers = d.workers()
            if workers:
                victim = rnd.choice(workers)
                try:
                    victim.send_signal(signal.SIGKILL)
                    kills.append(victim.pid)
                except psutil.NoSuchProcess:
                    pass

    answers, late, max_wait = {}, [], [0.0]

    def client(i):
        c = d.client(timeout=TIMEOUT + 30)
        sent = {}
        for j in range(PER_CLIENT):
            sid = 'c%02d_%03d' % (i, j)
            sent[sid] = time.monotonic()
            c.send(1002, transcribe_req(d.data, 'call.wav', sid=sid))
        for _ in range(PER_CLIENT):
            _, body = c.recv(TIMEOUT + 30)
            answers[body['speechID']] = body
            waited = time.monotonic() - sent[body['speechID']]
            max_wait[0] = max(max_wait[0], waited)
            if waited > TIMEOUT + 5:
                late.append((body['speechID'], waited))
        c.close()

    proxy.cut()                                   # the database is down from the start ...
    cut_at = time.monotonic()
    threading.Thread(target=killer, daemon=True).start()
    drop = os.path.join(d.base, 'batch', 'drop')
    os.makedirs(drop, exist_ok=True)
    for k in range(DROPPED):
        tiny_wav(os.path.join(drop, 'rec%03d.wav' % k))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert len(answers) == CLIENTS * PER_CLIENT
    assert not late, late[:5]
    wait_for(lambda: monitor(d)['scanner']['inFlight'] == 0 and not os.listdir(drop)
             and monitor(d)['counters'].get('accepted', 0) >= len(answers) - 50, 180, 'the dropped files taken')
    time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))    # ... for 30 s, by design
    proxy.restore()
    stop_killing.set()
    assert len(kills) >= 3

    accepted = [sid for sid, b in answers.items() if b['state'] != 'NONE']
    rejected = [b for b in answers.values() if b['state'] == 'NONE']
    assert all(b['result'] in ('6',) for b in rejected), rejected[:3]
    recs = wait_for(lambda: (lambda r: r if len(r) >= len(accepted) + DROPPED else None)(d.records()),
                    180, 'every record')
    ids = [r['data']['speechID'] for r in recs]
    assert len(ids) == len(set(ids)) == len(accepted) + DROPPED
    assert set(accepted) <= set(ids)
    assert sum(1 for r in recs if r['source'] == 'scanner') == DROPPED
    assert monitor(d)['counters']['accepted'] == len(ids)

    def final_rows():
        got = query(dbname, "SELECT speech_id, result FROM task WHERE state NOT IN ('INIT','CONVERT','RECOGNIZE')")
        return got if len(got) == len(ids) else None
    rows = wait_for(final_rows, 180, 'a final database row per task')
    assert {r['speech_id'] for r in rows} == set(ids)
    by_id = {r['data']['speechID']: r['data']['result'] for r in recs}
    assert all(by_id[r['speech_id']] == r['result'] for r in rows)

    wait_for(lambda: len({w for w, _ in receiver.deliveries}) >= len(ids), 180, 'a webhook per task')
    hooks = {}
    for wid, payload in receiver.deliveries:
        hooks.setdefault(wid, set()).add(payload['speechID'])
    assert all(len(v) == 1 for v in hooks.values())          # a webhook-id names one task
    assert {next(iter(v)) for v in hooks.values()} == set(ids)

    results = {}
    for r in recs:
        results[r['data']['result']] = results.get(r['data']['result'], 0) + 1
    print('chaos: %d answers (%d rejected), %d records %s, %d worker kills, %d webhook deliveries for %d ids, '
          'slowest answer %.1f s' % (len(answers), len(rejected), len(ids), results, len(kills),
                                     len(receiver.deliveries), len(hooks), max_wait[0]))
    procs = d.processes()
    for e in engines:
        e.close()
    d.stop()
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive
    zombies = [p for p in psutil.Process().children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies
    proxy.close()
