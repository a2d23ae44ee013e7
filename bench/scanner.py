#!/usr/bin/env python3
"""Drop-folder scanner figures: 10,000 tiny valid WAVs (0.1 s of silence) dropped at once
into a running daemon (pocketsphinx, 2 workers):

- one pass over the 10,000 files: CPU and wall time, as the scanner measures them
  around its walk (time.process_time; target < 1 s of CPU), and the same walk in-process;
- time from the drop until every file is claimed into .processing;
- Monitor (1003) round trip p50/p99 while idle, while the same workers are kept busy
  by a TCP client (4 tiny tasks in flight, the control), while the files are claimed,
  and while the scanner keeps the workers busy (target: p99 within 2x; on a machine
  with as many CPUs as workers the CPU-bound workers slow the master either way, so
  the client-fed control is the fair reference for the last window);
- optionally (--all-done) the time until every file has its record.

Usage: .venv/bin/python bench/scanner.py [--files 10000] [--workers 2] [--interval 1] [--busy-secs 20]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import wave

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import _scanner  # noqa: E402
from conftest import Daemon, transcribe_req  # noqa: E402
from core import pct  # noqa: E402
from test_scanner import scanning  # noqa: E402


def tiny_wavs(folder, n):
    """n WAVs of 0.1 s of 8 kHz 16-bit silence, written aside (to be renamed in at once)."""
    os.makedirs(folder, exist_ok=True)
    with wave.open(os.path.join(folder, 'proto.wav'), 'wb') as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b'\0\0' * 800)
    data = open(os.path.join(folder, 'proto.wav'), 'rb').read()
    os.unlink(os.path.join(folder, 'proto.wav'))
    names = ['call-%05d.wav' % i for i in range(n)]
    for name in names:
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data)
    return names


class Prober(threading.Thread):
    """Monitor requests one after another on one connection; keeps latencies and the last scanner status."""

    def __init__(self, d, pause=0.01):
        super().__init__(daemon=True)
        self.d, self.pause = d, pause
        self.samples, self.scanner = [], {}
        self.big_pass = None          # the status of a pass that saw the whole batch
        self.stop = threading.Event()
        self.n = 0

    def run(self):
        c = self.d.client()
        while not self.stop.is_set():
            t = time.perf_counter()
            c.send(1003, {'type': 'all'})
            _, body = c.recv(10)
            self.samples.append(time.perf_counter() - t)
            self.scanner = body['scanner']
            if self.scanner.get('filesSeen', 0) >= self.n and self.big_pass is None:
                self.big_pass = dict(self.scanner)
            time.sleep(self.pause)
        c.close()


def client_load(d, folder, name, secs, in_flight=4):
    """Keep `in_flight` tiny tasks running through TCP for `secs` (the control); returns tasks done."""
    c = d.client()
    n = sent = 0
    deadline = time.monotonic() + secs
    while sent < in_flight:
        c.send(1002, transcribe_req(folder, name, sid='ctl%d' % sent, keepSource=True))
        sent += 1
    while n < sent:
        c.recv(60)
        n += 1
        if time.monotonic() < deadline:
            c.send(1002, transcribe_req(folder, name, sid='ctl%d' % sent, keepSource=True))
            sent += 1
    c.close()
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--files', type=int, default=10000)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--interval', type=float, default=1.0)
    ap.add_argument('--idle-secs', type=float, default=5.0)
    ap.add_argument('--busy-secs', type=float, default=20.0, help='Monitor sampling after all are claimed')
    ap.add_argument('--all-done', action='store_true', help='also wait until every file has its record')
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix='svcmgr-bench-scan-')
    try:
        base = os.path.join(tmp, 'd')
        d = scanning(lambda **o: Daemon(base, **o), interval=args.interval, workers=args.workers,
                     max_tasks=100, timeout=600, source_after='delete')
        with open(d.ini) as f:
            text = f.read().replace('log_level = debug', 'log_level = info')
        with open(d.ini, 'w') as f:
            f.write(text)
        staging = os.path.join(base, 'staging')
        names = tiny_wavs(staging, args.files)
        # The walk alone, in this process, over the same tree (no daemon involved).
        walker = _scanner.Walker(staging, [], ['*.part', '*.tmp', '~*'], ['wav'])
        settler = _scanner.Settler()
        cpu = []
        for _ in range(5):
            c0, w0 = time.process_time(), time.perf_counter()
            files, _ = walker.walk()
            settler.update(files)
            cpu.append((time.process_time() - c0, time.perf_counter() - w0))
        print('in-process walk + settle of %d files: cpu %.3f s, wall %.3f s (median of 5)'
              % (len(files), statistics.median(c for c, _ in cpu), statistics.median(w for _, w in cpu)))

        d.start()
        print('daemon: %d workers, scan_interval_secs %g, %d CPUs' % (args.workers, args.interval, os.cpu_count()))
        probe = Prober(d)
        probe.n = args.files
        probe.start()
        time.sleep(args.idle_secs)
        idle = list(probe.samples)
        mark = len(probe.samples)
        tiny_wavs(d.data, 1)
        control_done = client_load(d, d.data, 'call-00000.wav', args.idle_secs * 2)
        control = probe.samples[mark:]
        mark = len(probe.samples)
        t0 = time.perf_counter()
        for name in names:
            os.rename(os.path.join(staging, name), os.path.join(d.batch, name))
        dropped = time.perf_counter()
        deadline = time.monotonic() + 600
        while probe.scanner.get('claimedTotal', 0) < args.files and time.monotonic() < deadline:
            time.sleep(0.01)
        claimed = time.perf_counter()
        claiming = probe.samples[mark:]
        mark = len(probe.samples)
        time.sleep(args.busy_secs)
        busy = probe.samples[mark:]
        big = probe.big_pass or {}
        print('drop of %d files (renames into the folder): %.3f s' % (args.files, dropped - t0))
        print('scanner pass over %d files: cpu %.3f s, wall %.3f s (target cpu < 1 s)'
              % (big.get('filesSeen', 0), big.get('scanCpuSecs', float('nan')), big.get('scanSecs', float('nan'))))
        print('time from the drop until all %d are claimed: %.2f s (scan interval %g s: a file is taken at the'
              ' second pass that sees it unchanged)' % (probe.scanner.get('claimedTotal', 0), claimed - dropped,
                                                         args.interval))
        done = probe.scanner.get('done', 0)
        print('tasks finished %.0f s after the last claim: %d (%.1f/s since the drop)'
              % (args.busy_secs, done, done / (time.perf_counter() - dropped)))
        print('control: %d tiny client tasks in %.0f s' % (control_done, args.idle_secs * 2))
        windows = (('idle', idle), ('client-fed work', control), ('drop until all claimed', claiming),
                   ('scanner-fed work', busy))
        for label, s in windows:
            print('Monitor latency %-24s (%5d samples): p50 %.2f ms, p99 %.2f ms, max %.2f ms'
                  % (label, len(s), statistics.median(s) * 1e3, pct(s, 99) * 1e3, max(s) * 1e3))
        print('Monitor p99 ratios (target <= 2x): claiming/idle %.2fx, scanner-fed/client-fed work %.2fx,'
              ' scanner-fed work/idle %.2fx' % (pct(claiming, 99) / pct(idle, 99), pct(busy, 99) / pct(control, 99),
                                                pct(busy, 99) / pct(idle, 99)))
        if args.all_done:
            while probe.scanner.get('done', 0) + probe.scanner.get('failed', 0) < args.files:
                time.sleep(0.5)
            print('all %d recorded and moved out %.1f s after the drop (%d failed)'
                  % (args.files, time.perf_counter() - dropped, probe.scanner.get('failed', 0)))
        probe.stop.set()
        probe.join()
        d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
