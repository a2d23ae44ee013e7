#!/usr/bin/env python3
"""Database writer figures, in one run against the MariaDB of [db] defaults (127.0.0.1:3306, root):

- the same batch of N small files through the real daemon with [db] enabled = false, then true
  (interleaved rounds, median): tasks/s each way, their ratio, the time until every row is final,
  and the writer's queue depth at its peak (Monitor's db.queuePeak);
- the writer alone, fed as fast as the Reporter could: events/s into the database, peak queue depth,
  and the replay rate of a spool of the same events.

Each run uses a database of its own, dropped at the end.
Usage: .venv/bin/python bench/db.py [--files 100] [--workers 2] [--rounds 2] [--events 20000]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import pymysql

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import _config  # noqa: E402
import _db  # noqa: E402
import _records  # noqa: E402
from conftest import FIXTURES, Daemon, transcribe_req, wait_for  # noqa: E402

HOST, PORT = '127.0.0.1', 3306


def server():
    return pymysql.connect(host=HOST, port=PORT, user='root', password='', autocommit=True)


def drop(name):
    with server() as conn, conn.cursor() as cur:
        cur.execute('DROP DATABASE IF EXISTS `%s`' % name)


def final_rows(name):
    with server() as conn, conn.cursor() as cur:
        cur.execute('SELECT COUNT(finished_at) FROM `%s`.task' % name)
        return cur.fetchone()[0]


def db_section(name):
    return '[db]\nenabled = true\nip = %s\nport = %d\nuser = root\npassword = ""\nname = %s\n' % (HOST, PORT, name)


def run_daemon(base, folder, files, workers, name=None):
    """(tasks/s as the client sees it, seconds until every row is final or None, queue peak or None)."""
    d = Daemon(base, workers=workers, max_tasks=len(files) + 10, timeout=600, roots='/')
    if name:
        d.write_ini(db_section(name))
        d.cli('db', 'init', check=True)
    d.start()
    try:
        c = d.client(timeout=900)
        t0 = time.perf_counter()
        for i, f in enumerate(files):
            c.send(1002, transcribe_req(folder, f, sid='b%04d' % i))
        answers = c.recv_n(len(files), timeout=1800)
        wall = time.perf_counter() - t0
        bad = [b for _, b in answers if b.get('result') != '0']
        if bad:
            print('  %d task(s) failed, e.g. %s' % (len(bad), bad[0]))
        rows_wall = peak = None
        if name:
            wait_for(lambda: final_rows(name) == len(files), 120, 'every row final', interval=0.01)
            rows_wall = time.perf_counter() - t0
            c.send(1003, {'type': 'all'})
            peak = c.recv(10)[1]['db']['queuePeak']
        return len(files) / wall, rows_wall, peak
    finally:
        d.stop()


def writer_alone(tmp, tasks):
    """Events/s of the writer fed at once with `tasks` tasks (4 events each), and its spool replay rate."""
    name = 'svcmgr_bench_%s' % uuid.uuid4().hex[:10]
    ini = os.path.join(tmp, 'writer.ini')
    with open(ini, 'w') as f:
        f.write(db_section(name))
    cfg = _config.load(ini)
    records = os.path.join(tmp, 'writer-records')
    try:
        _db.init(cfg, out=lambda *a: None)
        sink = _db.DatabaseSink(cfg, records)
        wait_for(lambda: sink.conn is not None, 10, 'the writer to connect')
        t = time.time()
        events = []
        for i in range(tasks):
            sid = 'w%06d' % i
            req = {'filePath': '/data', 'fileID': sid + '.wav', 'fileName': sid + '.wav', 'domainName': 'SGDefault'}
            events += [
                (_records.ACCEPTED, {'speechID': sid, 'source': 'client', 'state': 'INIT',
                                     'startTime': _records.stamp(t), 'created': t, 'request': req,
                                     'audioPath': '/data/out'}),
                (_records.STATE, {'speechID': sid, 'state': 'CONVERT', 'worker': 1, 'at': t + 0.1}),
                (_records.STATE, {'speechID': sid, 'state': 'RECOGNIZE', 'worker': 1, 'at': t + 0.2}),
                (_records.FINAL, {'data': {'speechID': sid, 'transcript': 'good morning', 'result': '0'},
                                  'state': 'DONE', 'startTime': _records.stamp(t), 'endTime': _records.stamp(t + 1),
                                  'processInterval': ['0.000000 < TRANSCRIBE_START', '1.000000 < TRANSCRIBE_END'],
                                  'source': 'client', 'worker': 1, 'duration': 1.0, 'request': req,
                                  'channels': [{'channel': 'A', 'transcript': 'good morning'}]})]
        t0 = time.perf_counter()
        for ev in events:
            sink.handle(*ev)
        handed = time.perf_counter() - t0
        wait_for(lambda: sink.written + sink.rejected >= len(events), 600, 'the writer', interval=0.01)
        wall = time.perf_counter() - t0
        peak = sink.peak
        sink.close()
        # The same events as a spool, replayed by a fresh writer at start.
        probe = _db.DatabaseSink(cfg, records, start=False)
        probe.spool.append([{'event': e, 'node': probe.node, 'serverSeq': 1, 'payload': p} for e, p in events])
        t0 = time.perf_counter()
        again = _db.DatabaseSink(cfg, records)
        wait_for(lambda: not len(again.spool), 600, 'the replay', interval=0.01)
        replay = time.perf_counter() - t0
        again.close()
        return len(events), handed, wall, peak, replay
    finally:
        drop(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--files', type=int, default=100)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--events', type=int, default=20000, help='events for the writer-alone figure')
    args = ap.parse_args()
    try:
        server().close()
    except pymysql.err.MySQLError as exc:
        sys.exit('bench/db.py: MariaDB is not reachable at %s:%s: %s' % (HOST, PORT, exc))
    tmp = tempfile.mkdtemp(prefix='svcmgr-bench-db-')
    try:
        folder = os.path.join(tmp, 'audio')
        os.makedirs(folder)
        files = []
        for i in range(args.files):
            files.append('m%04d.wav' % i)
            shutil.copy(os.path.join(FIXTURES, 'en_morning.wav'), os.path.join(folder, files[-1]))
        print('batch: %d x en_morning.wav, %d workers, %d CPUs' % (len(files), args.workers, os.cpu_count()))
        off, on, rows, peaks = [], [], [], []
        for r in range(args.rounds):
            off.append(run_daemon(os.path.join(tmp, 'off%d' % r), folder, files, args.workers)[0])
            name = 'svcmgr_bench_%s' % uuid.uuid4().hex[:10]
            try:
                rate, rows_wall, peak = run_daemon(os.path.join(tmp, 'on%d' % r), folder, files, args.workers, name)
            finally:
                drop(name)
            on.append(rate)
            rows.append(rows_wall)
            peaks.append(peak)
            print('round %d: db off %.2f tasks/s, db on %.2f tasks/s (every row final after %.2f s), '
                  'writer queue peak %d' % (r + 1, off[-1], on[-1], rows_wall, peak))
        off_m, on_m = statistics.median(off), statistics.median(on)
        print('daemon, db off: %.2f tasks/s' % off_m)
        print('daemon, db on:  %.2f tasks/s' % on_m)
        print('ratio on/off: %.3f' % (on_m / off_m))
        print('every row final %.2f s after the first request (median); writer queue depth at peak: %d'
              % (statistics.median(rows), max(peaks)))
        n, handed, wall, peak, replay = writer_alone(tmp, max(1, args.events // 4))
        print('writer alone: %d events handed over in %.3f s (%.1f us each), in the database after %.2f s '
              '(%.0f events/s), queue depth at peak %d' % (n, handed, handed / n * 1e6, wall, n / wall, peak))
        print('spool replay of the same %d events: %.2f s (%.0f events/s)' % (n, replay, n / replay))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
