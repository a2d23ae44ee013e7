#!/usr/bin/env python3
"""Core daemon figures, measured in one run on the same batch of fixture files:

- overhead: the batch through the daemon (N workers) vs the same engine called
  directly by a multiprocessing.Pool of N processes (target ratio <= 1.05);
- scaling: the daemon with 2 workers vs 1 (target >= 1.8x);
- Monitor latency p50/p99 while every worker is busy and 100 tasks queue (target p99 < 20 ms).

With --baseline OTHER_TREE (a checkout of an earlier commit), the daemon of that tree runs
in the same interleaved rounds, and the ratio of the two daemons' wall and CPU is printed.

Usage: .venv/bin/python bench/core.py [--files 100] [--workers 2] [--baseline PATH]
"""
import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import _audio  # noqa: E402
import _engine  # noqa: E402
from conftest import FIXTURES, Daemon, transcribe_req  # noqa: E402

_ENGINE = None


def _pool_init():
    global _ENGINE
    _ENGINE = _engine.PocketSphinxEngine()
    _ENGINE.load()


def _pool_job(path):
    # The same work as a daemon task: the 8 kHz WAV written beside, then the engine per channel.
    out = os.path.join(os.path.dirname(path), 'pool-out')
    stem = os.path.splitext(os.path.basename(path))[0]
    prepared = _audio.prepare(path, _ENGINE.sample_rate, audio_path=out, stem=stem)
    return [_ENGINE.recognize(pcm).text for pcm in prepared.engine_pcm]


def make_batch(folder, n):
    os.makedirs(folder, exist_ok=True)
    names = sorted(f for f in os.listdir(FIXTURES) if f.startswith('en_') and f.endswith('.wav'))
    files = []
    for i in range(n):
        dest = os.path.join(folder, 'f%03d_%s' % (i, names[i % len(names)]))
        shutil.copy(os.path.join(FIXTURES, names[i % len(names)]), dest)
        files.append(dest)
    return files


def run_daemon(base, files, workers, monitor_samples=None, root=None):
    d = Daemon(base, workers=workers, max_tasks=len(files) + 10, timeout=600, roots='/',
               **({'root': root} if root else {}))
    d.start()
    try:
        c = d.client(timeout=900)
        latencies = []
        stop = threading.Event()

        def probe():
            m = d.client()
            while not stop.is_set():
                t = time.perf_counter()
                m.send(1003, {'type': 'all'})
                m.recv(10)
                latencies.append(time.perf_counter() - t)
                time.sleep(0.02)
            m.close()
        cpu0 = daemon_cpu(d)
        t0 = time.perf_counter()
        for i, path in enumerate(files):
            c.send(1002, transcribe_req(os.path.dirname(path), os.path.basename(path), sid='b%d' % i))
        prober = None
        if monitor_samples is not None:
            prober = threading.Thread(target=probe)
            prober.start()
        answers = c.recv_n(len(files), timeout=1800)
        wall = time.perf_counter() - t0
        cpu = daemon_cpu(d) - cpu0
        stop.set()
        if prober:
            prober.join()
            monitor_samples.extend(latencies)
        bad = [b for _, b in answers if b.get('result') != '0']
        if bad:
            print('  %d task(s) failed, e.g. %s' % (len(bad), bad[0]))
        return wall, cpu
    finally:
        d.stop()


def daemon_cpu(d):
    """CPU seconds (user + system) used so far by the daemon's master and live children."""
    total = 0.0
    for p in d.processes():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_pool(files, workers):
    with multiprocessing.get_context('fork').Pool(workers, initializer=_pool_init) as pool:
        pool.map(_pool_job, files[:workers])          # warm-up: model loaded in every process
        procs = [psutil.Process(p.pid) for p in pool._pool]
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        t0 = time.perf_counter()
        pool.map(_pool_job, files, chunksize=1)
        wall = time.perf_counter() - t0
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        return wall, cpu


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--files', type=int, default=100)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--baseline', help='another source tree whose daemon runs in the same rounds')
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix='svcmgr-bench-')
    try:
        files = make_batch(os.path.join(tmp, 'audio'), args.files)
        print('batch: %d files, %d workers, %d CPUs' % (len(files), args.workers, os.cpu_count()))
        samples = []
        # Interleaved rounds on a shared machine: each figure is the median of its rounds.
        runs = {'daemon': [], 'pool': [], 'daemon1': []}
        for r in range(args.rounds):
            runs['daemon'].append(run_daemon(os.path.join(tmp, 'dn%d' % r), files, args.workers))
            runs['pool'].append(run_pool(files, args.workers))
            runs['daemon1'].append(run_daemon(os.path.join(tmp, 'd1%d' % r), files, 1))
            if args.baseline:
                runs.setdefault('baseline', []).append(
                    run_daemon(os.path.join(tmp, 'db%d' % r), files, args.workers, root=args.baseline))
                print('round %d: baseline daemon %.2f s (cpu %.1f s)' % (r + 1, *runs['baseline'][-1]))
            print('round %d: daemon %.2f s (cpu %.1f s), pool %.2f s (cpu %.1f s), daemon 1 worker %.2f s'
                  % (r + 1, *runs['daemon'][-1], *runs['pool'][-1], runs['daemon1'][-1][0]))
        daemon_n, daemon_cpu_n = [statistics.median(x) for x in zip(*runs['daemon'])]
        pool_n, pool_cpu = [statistics.median(x) for x in zip(*runs['pool'])]
        daemon_1 = statistics.median(x[0] for x in runs['daemon1'])
        print('daemon, %d workers: %.2f s wall, %.1f s CPU (master + workers)' % (args.workers, daemon_n, daemon_cpu_n))
        print('multiprocessing.Pool(%d), same engine: %.2f s wall, %.1f s CPU' % (args.workers, pool_n, pool_cpu))
        print('overhead ratio daemon/pool: wall %.3f, CPU %.3f (target <= 1.05)'
              % (daemon_n / pool_n, daemon_cpu_n / pool_cpu))
        paired = [d[0] / p[0] for d, p in zip(runs['daemon'], runs['pool'])]
        print('paired per-round wall ratios: %s; median %.3f'
              % (', '.join('%.3f' % x for x in paired), statistics.median(paired)))
        if args.baseline:
            base_n, base_cpu = [statistics.median(x) for x in zip(*runs['baseline'])]
            print('baseline daemon (%s): %.2f s wall, %.1f s CPU; overhead vs pool: wall %.3f, CPU %.3f'
                  % (args.baseline, base_n, base_cpu, base_n / pool_n, base_cpu / pool_cpu))
            pairs = [d[0] / b[0] for d, b in zip(runs['daemon'], runs['baseline'])]
            print('this tree / baseline: wall %.3f, CPU %.3f; paired wall ratios %s'
                  % (daemon_n / base_n, daemon_cpu_n / base_cpu, ', '.join('%.3f' % x for x in pairs)))
        print('daemon, 1 worker: %.2f s' % daemon_1)
        print('scaling 1 -> %d workers: %.2fx (target >= 1.8x)' % (args.workers, daemon_1 / daemon_n))
        # Monitor latency in a run of its own, so its probing costs the overhead figures nothing.
        run_daemon(os.path.join(tmp, 'dm'), files, args.workers, monitor_samples=samples)
        if samples:
            print('Monitor latency while busy (%d samples): p50 %.2f ms, p99 %.2f ms, max %.2f ms (target p99 < 20 ms)'
                  % (len(samples), statistics.median(samples) * 1e3, pct(samples, 99) * 1e3, max(samples) * 1e3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
