#!/usr/bin/env python3
"""The operator's first result through the drop folder, with the shipped app.ini (only the
port changed, to a free one; every relative path in a temporary copy of the tree):

- seconds from `cp tests/fixtures/en_hello.wav batch/` to its line in records/, split into
  the task's own time (TRANSCRIBE_START .. TRANSCRIBE_END: conversion and recognition) and
  the rest (settling, claim, submit, record); with inotify (scan_watch = auto, the shipped
  default) over --runs copies, and once with scan_watch = poll (the 40 s scans alone);
- the scanner's CPU per hour while idle (nothing dropped; --idle-files non-audio files in batch/) with inotify at the shipped 40 s
  interval, polling at 40 s, and polling at 1 s (what polling alone would need to come
  near inotify's latency), measured over --idle-secs each from /proc/<pid>/schedstat and scaled to an hour.

Usage: .venv/bin/python bench/first_result.py [--runs 5] [--idle-secs 60] [--idle-files 1000] [--no-poll-drop]
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from _children import title_of  # noqa: E402
from helpers import free_port  # noqa: E402

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'en_hello.wav')


class Shipped:
    """The shipped app.ini in a folder of its own, `changes` = {key: value} applied to it."""

    def __init__(self, base, **changes):
        self.base = base
        os.makedirs(os.path.join(base, 'tests', 'fixtures'), exist_ok=True)   # a shipped allowed root
        with open(os.path.join(ROOT, 'app.ini'), encoding='utf-8') as f:
            text = f.read()
        changes.setdefault('port', free_port())
        for key, value in changes.items():
            text, n = re.subn(r'(?m)^%s = .*$' % key, '%s = %s' % (key, value), text, count=1)  # the first: [server] port
            assert n == 1, key
        self.ini = os.path.join(base, 'app.ini')
        with open(self.ini, 'w', encoding='utf-8') as f:
            f.write(text)
        self.batch = os.path.join(base, 'batch')

    def cli(self, *args):
        return subprocess.run([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '-c', self.ini] + list(args),
                              capture_output=True, text=True, timeout=300)

    def __enter__(self):
        proc = self.cli('start')
        if proc.returncode:
            raise SystemExit('start failed: %s %s' % (proc.stdout, proc.stderr))
        try:
            self.wait(lambda: self.scanner() is not None, 30)
            self.wait(lambda: self.log_has('scanner: watching'), 60)
        except BaseException:
            self.cli('stop')
            raise
        return self

    def __exit__(self, *exc):
        self.cli('stop')

    @staticmethod
    def wait(predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit('timed out')
            time.sleep(0.01)

    def log_has(self, text):
        try:
            with open(os.path.join(self.base, 'logs', 'app.log'), encoding='utf-8', errors='replace') as f:
                return text in f.read()
        except FileNotFoundError:
            return False

    def scanner(self):
        try:
            with open(os.path.join(self.base, 'svcmgr.pid')) as f:
                master = psutil.Process(int(f.read()))
            for p in master.children():
                if title_of(p).startswith('svcmgr: scanner'):
                    return p
        except (OSError, ValueError, psutil.NoSuchProcess):
            return None
        return None

    def records(self):
        out = []
        for path in glob.glob(os.path.join(self.base, 'records', '*.json')):
            with open(path, encoding='utf-8') as f:
                out += [json.loads(line) for line in f if line.strip()]
        return out


def task_secs(rec):
    marks = {text.partition(' < ')[2]: float(text.partition(' < ')[0]) for text in rec['processInterval']}
    return marks['TRANSCRIBE_END'] - marks['TRANSCRIBE_START']


def drop_once(s, name):
    before = len(s.records())
    start = time.perf_counter()
    shutil.copy(FIXTURE, os.path.join(s.batch, name))
    s.wait(lambda: len(s.records()) > before, 300)
    total = time.perf_counter() - start
    rec = [r for r in s.records() if r['request'].get('fileName') == name][0]
    assert rec['data']['result'] == '0', rec
    return total, task_secs(rec), rec['data']['transcript']


def drops(tmp, label, runs, **changes):
    with Shipped(os.path.join(tmp, label), **changes) as s:
        out = [drop_once(s, 'first-%d.wav' % i) for i in range(runs)]
    for total, task, text in out:
        print('  %-8s cp -> record %6.2f s  (task %.2f s, the rest %.2f s)  "%s"' % (label, total, task, total - task, text))
    totals = sorted(t for t, _, _ in out)
    rests = sorted(t - k for t, k, _ in out)
    print('  %-8s cp -> record: min %.2f  median %.2f  max %.2f s; without the task: median %.2f s, max %.2f s'
          % (label, totals[0], totals[len(totals) // 2], totals[-1], rests[len(rests) // 2], rests[-1]))
    return totals[len(totals) // 2]


def cpu_ns(pid):
    """CPU time of a process in ns (/proc/<pid>/schedstat: clock ticks are too coarse for an idle one)."""
    with open('/proc/%d/schedstat' % pid) as f:
        return int(f.read().split()[0])


def idle_cpu(tmp, label, secs, files, **changes):
    base = os.path.join(tmp, label)
    # What an operator's drop folder tends to hold besides audio: notes, exports, in folders.
    for i in range(files):
        folder = os.path.join(base, 'batch', 'archive', '%02d' % (i % 20))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'note-%05d.txt' % i), 'w') as f:
            f.write('x')
    with Shipped(base, **changes) as s:
        p = s.scanner()
        time.sleep(2)
        t0 = cpu_ns(p.pid)
        w0 = time.monotonic()
        time.sleep(secs)
        t1 = cpu_ns(p.pid)
        wall = time.monotonic() - w0
    cpu = (t1 - t0) / 1e9
    per_hour = cpu / wall * 3600
    print('  %-22s %.4f s CPU in %.0f s  ->  %.2f s CPU per hour' % (label, cpu, wall, per_hour))
    return per_hour


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--idle-secs', type=float, default=60)
    ap.add_argument('--idle-files', type=int, default=1000, help='non-audio files in batch/archive/ while idle')
    ap.add_argument('--no-poll-drop', action='store_true', help='skip the ~80 s drop with polling only')
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix='svcmgr-first-')
    try:
        print('cp of %s into batch/ with the shipped app.ini (scan_interval_secs 40, scan_settle_secs 1):'
              % os.path.relpath(FIXTURE, ROOT))
        fast = drops(tmp, 'inotify', args.runs)
        if not args.no_poll_drop:
            slow = drops(tmp, 'poll', 1, scan_watch='poll')
            print('  polling / inotify: %.1fx' % (slow / fast))
        print('idle scanner CPU (nothing dropped; %d non-audio files in 20 folders of batch/):' % args.idle_files)
        n = args.idle_files
        a = idle_cpu(tmp, 'inotify, 40 s scans', args.idle_secs, n)
        b = idle_cpu(tmp, 'poll, 40 s scans', args.idle_secs, n, scan_watch='poll')
        c = idle_cpu(tmp, 'poll, 1 s scans', args.idle_secs, n, scan_watch='poll', scan_interval_secs=1)
        print('  ratios: poll 40 s / inotify %.2f; poll 1 s / inotify %.2f' % (b / a if a else 0, c / a if a else 0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
