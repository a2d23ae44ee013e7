#!/usr/bin/env python3
"""Cluster mode's own cost (issue 15), with the scripted instant legacy engine
(tests/legacy_engine.py: a worker prepares each task, the engine answers at once), real
nodes, real RabbitMQ and MariaDB, Debian's HAProxy in front, measured in one run:

- tasks/s through 1 node without cluster mode, 1 node with it, 3 nodes with it
  (targets: cluster/single on one node >= 0.8x; 3 nodes / 1 node >= 1.5x), and 3 nodes
  without it (islands behind HAProxy: what three nodes can give on this machine at all);
- latency per task of one client sending one task at a time, single vs cluster on one
  node: p50/p99 and the added latency (target: added p99 < 10 ms).

Every configuration is driven the same way: clients connect through HAProxy, so the
ratios compare like with like. Without cluster mode in this tree (no [cluster] in
_config.py) the cluster parts are skipped and the run says so.

Usage: .venv/bin/python bench/cluster.py [--tasks 2000] [--clients 8] [--window 8]
                                         [--latency-tasks 300] [--rounds 1]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import _config  # noqa: E402
from cluster import Cluster, drop_database  # noqa: E402
from conftest import debian_program  # noqa: E402
from helpers import server_connection  # noqa: E402

TARGET_CLUSTER_VS_SINGLE = 0.8
TARGET_THREE_VS_ONE = 1.5
TARGET_ADDED_P99_MS = 10.0


def cluster_mode_available():
    return '[cluster]' in _config.CONFIGSPEC


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def start(base, haproxy, n, cluster_mode):
    dbname = 'svcmgr_bench_%s' % uuid.uuid4().hex[:10]
    # Two workers per node (the machine's core count), every task to the engine at once.
    c = Cluster(base, haproxy, dbname, n=n, cluster_mode=cluster_mode, engine='remote', webhook=False,
                workers=2, max_tasks=5000, timeout=120, mp3='false', engine_concurrency=64,
                log_level='info', broker_link=False)
    try:
        c.start()
    except BaseException:
        stop(c)
        raise
    return c


def stop(c):
    try:
        c.close()
    finally:
        drop_database(c.dbname)


def throughput(c, tasks, clients, window, tag):
    """tasks/s of `tasks` tasks from `clients` connections through HAProxy, each keeping
    `window` tasks in flight."""
    per = [tasks // clients + (1 if i < tasks % clients else 0) for i in range(clients)]
    errors = []
    bad = []
    barrier = threading.Barrier(clients + 1)

    def run(i):
        cl = c.client(timeout=300)
        try:
            sids = ['%s-%d-%d' % (tag, i, k) for k in range(per[i])]
            barrier.wait()
            sent = got = 0
            while got < len(sids):
                while sent < len(sids) and sent - got < window:
                    cl.send(1002, c.request(sids[sent]))
                    sent += 1
                _, body = cl.recv(300)
                got += 1
                if body.get('result') != '0':
                    bad.append(body)
        except Exception as exc:    # the run's figure is void; say why instead of hanging
            errors.append(exc)
            if not barrier.broken:
                barrier.abort()
        finally:
            cl.close()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError('%s: a client failed: %r' % (tag, errors[0]))
    if bad:
        print('  %s: %d task(s) did not end with result 0, e.g. %s' % (tag, len(bad), bad[0]))
    return tasks / wall


def latencies(c, n, tag):
    """Seconds per task of one client sending one task at a time through HAProxy."""
    cl = c.client(timeout=60)
    out = []
    try:
        for k in range(n):
            t = time.perf_counter()
            cl.send(1002, c.request('%s-%d' % (tag, k)))
            _, body = cl.recv(60)
            out.append(time.perf_counter() - t)
            if body.get('result') != '0':
                print('  %s: task ended with %s' % (tag, body))
    finally:
        cl.close()
    return out


def measure(tmp, haproxy, name, n, cluster_mode, args, round_no):
    c = start(os.path.join(tmp, '%s-r%d' % (name, round_no)), haproxy, n, cluster_mode)
    try:
        throughput(c, 4 * args.clients, args.clients, 2, '%s-warm%d' % (name, round_no))   # engines, caches, pools
        rate = throughput(c, args.tasks, args.clients, args.window, '%s-r%d' % (name, round_no))
        lat = latencies(c, args.latency_tasks, '%s-lat%d' % (name, round_no)) if n == 1 else []
        return rate, lat
    finally:
        stop(c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tasks', type=int, default=2000)
    ap.add_argument('--clients', type=int, default=8)
    ap.add_argument('--window', type=int, default=8, help='tasks each client keeps in flight')
    ap.add_argument('--latency-tasks', type=int, default=300)
    ap.add_argument('--rounds', type=int, default=1)
    args = ap.parse_args()
    haproxy = debian_program('/usr/sbin/haproxy', 'haproxy')
    server_connection().close()          # MariaDB must be up before anything starts
    have_cluster = cluster_mode_available()
    # single-3 (three islands behind HAProxy, no shared queue) is the reference: what three nodes
    # can give on this machine at all, whatever cluster mode adds.
    configs = [('single-1', 1, False), ('single-3', 3, False)]
    if have_cluster:
        configs += [('cluster-1', 1, True), ('cluster-3', 3, True)]
    tmp = tempfile.mkdtemp(prefix='svcmgr-bench-cluster-')
    print('%d tasks per run from %d clients (%d in flight each) through HAProxy, scripted instant legacy '
          'engine, 2 workers per node, %d CPUs, %d round(s)'
          % (args.tasks, args.clients, args.window, os.cpu_count(), args.rounds))
    if not have_cluster:
        print('SKIPPED: this tree has no [cluster] section in _config.py (cluster mode not merged): only '
              'nodes without cluster mode are measured; no cluster figures, no ratios against the targets.')
    rates = {name: [] for name, _, _ in configs}
    lats = {name: [] for name, _, _ in configs}
    try:
        # Interleaved rounds on a shared machine: each figure is the median of its rounds.
        for r in range(args.rounds):
            for name, n, mode in configs:
                rate, lat = measure(tmp, haproxy, name, n, mode, args, r)
                rates[name].append(rate)
                lats[name].extend(lat)
                print('round %d: %-9s %4d node(s), cluster mode %-3s: %7.1f tasks/s'
                      % (r + 1, name, n, 'on' if mode else 'off', rate))
            if have_cluster:
                # Paired within the round: the machine's load moves less in one round than over all.
                print('round %d: cluster-1 / single-1 %.2fx, cluster-3 / cluster-1 %.2fx'
                      % (r + 1, rates['cluster-1'][-1] / rates['single-1'][-1],
                         rates['cluster-3'][-1] / rates['cluster-1'][-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print()
    print('tasks/s, 1 node without cluster mode: %.1f' % med['single-1'])
    print('tasks/s, 3 nodes without cluster mode (islands behind HAProxy, reference): %.1f, %.2fx of 1 node'
          % (med['single-3'], med['single-3'] / med['single-1']))
    single = lats['single-1']
    print('latency per task, 1 node without cluster mode (%d tasks): p50 %.2f ms, p99 %.2f ms'
          % (len(single), statistics.median(single) * 1e3, pct(single, 99) * 1e3))
    if not have_cluster:
        print('SKIPPED: tasks/s with cluster mode on 1 node and on 3 nodes, their ratios (targets >= %.1fx and '
              '>= %.1fx) and the added latency (target p99 < %.0f ms): cluster mode is not in this tree.'
              % (TARGET_CLUSTER_VS_SINGLE, TARGET_THREE_VS_ONE, TARGET_ADDED_P99_MS))
        return
    print('tasks/s, 1 node with cluster mode:    %.1f' % med['cluster-1'])
    print('tasks/s, 3 nodes with cluster mode:   %.1f' % med['cluster-3'])
    one = med['cluster-1'] / med['single-1']
    three = med['cluster-3'] / med['cluster-1']
    if args.rounds > 1:
        print('median of the rounds\' paired ratios: cluster-1 / single-1 %.2fx, cluster-3 / cluster-1 %.2fx'
              % (statistics.median(c / s for c, s in zip(rates['cluster-1'], rates['single-1'])),
                 statistics.median(c / s for c, s in zip(rates['cluster-3'], rates['cluster-1']))))
    print('cluster mode on 1 node / single-node mode: %.2fx (target >= %.1fx): %s'
          % (one, TARGET_CLUSTER_VS_SINGLE, 'met' if one >= TARGET_CLUSTER_VS_SINGLE else 'NOT met'))
    print('3 nodes / 1 node (both cluster mode): %.2fx (target >= %.1fx): %s'
          % (three, TARGET_THREE_VS_ONE, 'met' if three >= TARGET_THREE_VS_ONE else 'NOT met'))
    print('3 nodes / 1 node without cluster mode: %.2fx' % (med['cluster-3'] / med['single-1']))
    clus = lats['cluster-1']
    p50 = (statistics.median(clus) - statistics.median(single)) * 1e3
    p99 = (pct(clus, 99) - pct(single, 99)) * 1e3
    print('latency per task, 1 node with cluster mode (%d tasks): p50 %.2f ms, p99 %.2f ms'
          % (len(clus), statistics.median(clus) * 1e3, pct(clus, 99) * 1e3))
    print('added latency per task (cluster - single): p50 %.2f ms, p99 %.2f ms (target p99 < %.0f ms): %s'
          % (p50, p99, TARGET_ADDED_P99_MS, 'met' if p99 < TARGET_ADDED_P99_MS else 'NOT met'))


if __name__ == '__main__':
    main()
