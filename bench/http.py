#!/usr/bin/env python3
"""HTTP API figures, measured in one run on the same daemon, engine and files:

- throughput: tasks/s of a batch through POST /v1/audio/transcriptions (uploads, synchronous,
  `--concurrency` clients) vs the same files through 1002 requests on one TCP connection
  (paths), in interleaved rounds; target ratio HTTP/1002 >= 0.9;
- /metrics latency p50/p99 while every worker is busy and 100 tasks are queued (target p99 < 20 ms).

Usage: .venv/bin/python bench/http.py [--files 40] [--workers 2] [--rounds 2] [--concurrency 8]
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This file is bench/http.py: with bench/ first on sys.path it would hide the standard library's http.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != HERE]
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import http.client  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import requests  # noqa: E402

from conftest import Daemon, long_wav, transcribe_req, wait_for  # noqa: E402

_spec = importlib.util.spec_from_file_location('bench_core', os.path.join(HERE, 'core.py'))
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)
make_batch = _core.make_batch


def run_1002(d, files, tag):
    c = d.client(timeout=900)
    t = time.perf_counter()
    for i, path in enumerate(files):
        c.send(1002, transcribe_req(os.path.dirname(path), os.path.basename(path), sid='%s-%d' % (tag, i)))
    bodies = [body for _, body in c.recv_n(len(files), timeout=900)]
    wall = time.perf_counter() - t
    c.close()
    assert all(b['result'] == '0' for b in bodies), [b for b in bodies if b['result'] != '0'][:1]
    return wall


def run_http(d, files, tag, concurrency):
    local = threading.local()

    def one(item):
        i, path = item
        s = getattr(local, 's', None) or requests.Session()
        local.s = s
        with open(path, 'rb') as f:
            r = s.post(d.url + '/v1/audio/transcriptions', files={'file': (os.path.basename(path), f)},
                       data={'model': 'm', 'speechID': '%s-%d' % (tag, i)}, timeout=900)
        assert r.status_code == 200, r.text
        return r.json()['text']
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, enumerate(files)))
    return time.perf_counter() - t


def metrics_latency(d, tmp, workers, samples=300):
    """Fill every worker and queue 100 more long tasks, then time /metrics."""
    path = long_wav(os.path.join(tmp, 'long.wav'), 30)
    c = d.client(timeout=900)
    for i in range(workers + 100):
        c.send(1002, transcribe_req(os.path.dirname(path), os.path.basename(path), sid='busy-%d' % i))
    # A plain http.client connection (kept alive) as the probe, so that the figure is the
    # server's latency more than the parsing of a heavier client library.
    hc = http.client.HTTPConnection('127.0.0.1', d.http_port, timeout=30)

    def get():
        hc.request('GET', '/metrics')
        r = hc.getresponse()
        return r.status, r.read().decode()

    def depth():
        for line in get()[1].splitlines():
            if line.startswith('svcmgr_queue_depth '):
                return float(line.split()[1])
        return 0
    wait_for(lambda: depth() >= 100, 60, '100 queued tasks')
    lat, depths = [], [depth()]
    for _ in range(samples):
        t = time.perf_counter()
        status, _ = get()
        lat.append(time.perf_counter() - t)
        assert status == 200
    depths.append(depth())
    # The same moment through 1003 Monitor, for scale: how much of the tail is the machine's.
    mon = d.client()
    ref = []
    for _ in range(samples):
        t = time.perf_counter()
        mon.send(1003, {'type': 'all'})
        mon.recv(10)
        ref.append(time.perf_counter() - t)
    mon.close()
    c.close()
    lat.sort()
    ref.sort()
    return (statistics.median(lat), lat[int(len(lat) * 0.99) - 1], min(depths),
            statistics.median(ref), ref[int(len(ref) * 0.99) - 1])


def _up(url):
    try:
        return requests.get(url + '/healthz', timeout=2).status_code == 200
    except requests.RequestException:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--files', type=int, default=40)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--concurrency', type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix='svcmgr-bench-http-') as tmp:
        files = make_batch(os.path.join(tmp, 'batch'), args.files)
        d = Daemon(os.path.join(tmp, 'd'), workers=args.workers, max_tasks=args.files + args.workers + 110,
                   timeout=900, roots='/', http='true', http_extra='max_uploads = 64\n')
        d.url = 'http://127.0.0.1:%d' % d.http_port
        d.start()
        try:
            wait_for(lambda: _up(d.url), 30, 'web')
            run_1002(d, files[:4], 'warm')
            tcp, http = [], []
            for r in range(args.rounds):
                tcp.append(run_1002(d, files, 'tcp%d' % r))
                http.append(run_http(d, files, 'http%d' % r, args.concurrency))
                print('round %d: 1002 %.2f tasks/s, HTTP %.2f tasks/s' % (
                    r + 1, len(files) / tcp[-1], len(files) / http[-1]), flush=True)
            tcp_rate, http_rate = len(files) / statistics.median(tcp), len(files) / statistics.median(http)
            print('throughput (%d files, %d workers, %d HTTP clients): 1002 %.2f tasks/s, HTTP %.2f tasks/s, '
                  'HTTP/1002 = %.2fx (target >= 0.9)' % (args.files, args.workers, args.concurrency, tcp_rate,
                                                         http_rate, http_rate / tcp_rate))
            p50, p99, depth, m50, m99 = metrics_latency(d, tmp, args.workers)
            print('/metrics with %d busy workers and %d queued: p50 %.1f ms, p99 %.1f ms (target p99 < 20 ms); '
                  '1003 Monitor at the same time: p50 %.1f ms, p99 %.1f ms; load average %.1f'
                  % (args.workers, depth, p50 * 1000, p99 * 1000, m50 * 1000, m99 * 1000, os.getloadavg()[0]))
        finally:
            d.stop()


if __name__ == '__main__':
    main()
