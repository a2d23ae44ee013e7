#!/usr/bin/env python3
"""Webhook delivery under load: N tasks (default 1,000) through a real daemon, once without a
webhook and once with a receiver that takes 200 ms per POST. Prints the Monitor (1003)
round-trip p50/p99 of both runs, their ratio, and how many payloads arrived.

    .venv/bin/python bench/webhook.py [-n 1000] [--workers 2] [--delay 0.2] [--concurrency 4]
"""
import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)
from conftest import Daemon, wait_for, transcribe_req  # noqa: E402
from test_webhook import Receiver  # noqa: E402
import core  # noqa: E402

FIXTURE = 'en_morning.wav'       # the smallest speech fixture, about 1 s


class MonitorProbe(threading.Thread):
    """Sends Monitor (type all) on one connection every `period` s and records round trips."""

    def __init__(self, port, period):
        super().__init__(daemon=True)
        self.port, self.period = port, period
        self.samples = []
        self.stopping = threading.Event()
        self.last = None

    def run(self):
        from conftest import Client
        c = Client(self.port, timeout=30)
        while not self.stopping.is_set():
            t = time.perf_counter()
            c.send(1003, {'type': 'all'})
            _, body = c.recv(30)
            self.samples.append(time.perf_counter() - t)
            self.last = body
            self.stopping.wait(self.period)
        c.close()


def pct(values, p):
    """Percentile in milliseconds."""
    return core.pct(values, p) * 1000


def run(n, workers, webhook, delay, concurrency, period):
    base = tempfile.mkdtemp(prefix='svcmgr-bench-webhook-')
    d = Daemon(base, workers=workers, max_tasks=n + 10, timeout=3600, graceful=10)
    rx = None
    if webhook:
        rx = Receiver(behaviour=lambda req, nth: (200, {}, b'', delay))
        d.write_ini('[webhook]\nurl = %s\nconcurrency = %d\nread_timeout_secs = 30\n'
                    'backoff_base_secs = 0.5\nbackoff_max_secs = 5\n' % (rx.url, concurrency))
    folder, name = d.fixture(FIXTURE)
    d.start()
    probe = MonitorProbe(d.port, period)
    try:
        c = d.client(timeout=3600)
        probe.start()
        wait_for(lambda: len(probe.samples) >= 20, 30, 'idle Monitor samples')
        t0 = time.monotonic()
        for i in range(n):
            c.send(1002, transcribe_req(folder, name, sid='b%05d' % i))
        answers = c.recv_n(n, timeout=3600)
        t_answers = time.monotonic() - t0
        during = list(probe.samples)
        ok = sum(1 for _, b in answers if b.get('result') == '0')
        arrived, t_all = None, None
        if webhook:
            wait_for(lambda: len(rx.speech_ids()) >= n, 3600, 'all deliveries', interval=0.5)
            t_all = time.monotonic() - t0
            arrived = len(rx.speech_ids())
        probe.stopping.set()
        probe.join(35)
        c.close()
        return {'samples': during, 'all_samples': list(probe.samples), 'ok': ok, 't_answers': t_answers,
                'arrived': arrived, 'requests': len(rx.requests) if rx else None, 't_all': t_all,
                'outbox': (probe.last or {}).get('outbox')}
    finally:
        probe.stopping.set()
        d.stop()
        if rx:
            rx.stop()
        shutil.rmtree(base, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('-n', type=int, default=1000, help='tasks per run (default 1000)')
    ap.add_argument('--workers', type=int, default=os.cpu_count() or 2, help='worker processes (default: CPUs)')
    ap.add_argument('--delay', type=float, default=0.2, help='receiver answer time in s (default 0.2)')
    ap.add_argument('--concurrency', type=int, default=4, help='webhook sender threads (default 4)')
    ap.add_argument('--period', type=float, default=0.02, help='seconds between Monitor requests (default 0.02)')
    args = ap.parse_args()
    print('%d tasks of %s, %d workers, receiver %.0f ms, %d sender threads, Monitor every %.0f ms on %s'
          % (args.n, FIXTURE, args.workers, args.delay * 1000, args.concurrency, args.period * 1000,
             socket.gethostname()))
    results = {}
    for label, webhook in (('no webhook', False), ('webhook', True)):
        r = run(args.n, args.workers, webhook, args.delay, args.concurrency, args.period)
        results[label] = r
        s = r['samples']
        line = '%-10s  answers %d/%d in %6.1f s  Monitor n=%5d  p50 %6.2f ms  p99 %6.2f ms  max %6.2f ms' % (
            label, r['ok'], args.n, r['t_answers'], len(s), pct(s, 50), pct(s, 99), max(s) * 1000)
        if webhook:
            line += '\n%-10s  arrived %d/%d (%d POSTs) %.1f s after the first task; outbox at the end: %s' % (
                '', r['arrived'], args.n, r['requests'], r['t_all'], r['outbox'])
        print(line, flush=True)
    off, on = results['no webhook']['samples'], results['webhook']['samples']
    print('p99 ratio webhook / no webhook: %.2f (goal: <= 2); p50 ratio %.2f'
          % (pct(on, 99) / pct(off, 99), pct(on, 50) / pct(off, 50)))
    print('all %d payloads arrived: %s' % (args.n, results['webhook']['arrived'] == args.n))


if __name__ == '__main__':
    main()
