#!/usr/bin/env python3
"""An operator's first hour from a fresh clone, timed: `git clone` of this tree's HEAD,
`pip install .` into a new venv, `svcmgr --version`, `svcmgr start` (the shipped app.ini,
only the port moved to a free one so it cannot meet another daemon on 9099), then
`svcmgr transcribe --out` on a folder of --files copies of the fixtures on a pseudo-terminal
(the progress line), and `svcmgr stop`. Prints each step's seconds, the last progress line,
the summary, and the count of results by code (target: all 0, none 6).

Usage: .venv/bin/python bench/fresh_clone.py [--files 500] [--keep-tmp]
"""
import argparse
import collections
import glob
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def timed(label, argv, **kw):
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, **kw)
    secs = time.perf_counter() - start
    print('%-34s %7.1f s  exit %d  %s' % (label, secs, proc.returncode, (proc.stdout + proc.stderr).strip()[-160:]))
    if proc.returncode:
        raise SystemExit('%s failed' % label)
    return proc


def on_pty(argv, cwd):
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    shown = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(), shown.decode('utf-8', 'replace')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--files', type=int, default=500)
    ap.add_argument('--keep-tmp', action='store_true')
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix='svcmgr-clone-')
    clone, venv = os.path.join(tmp, 'svcmgr'), os.path.join(tmp, 'venv')
    svcmgr = os.path.join(venv, 'bin', 'svcmgr')
    started = False
    try:
        timed('git clone', ['git', 'clone', '-q', ROOT, clone])
        timed('python3 -m venv', [sys.executable, '-m', 'venv', venv])
        timed('pip install .', [os.path.join(venv, 'bin', 'pip'), 'install', '-q', '.'], cwd=clone)
        timed('svcmgr --version', [svcmgr, '--version'], cwd=clone)
        ini = os.path.join(clone, 'app.ini')
        with open(ini, encoding='utf-8') as f:
            text = re.sub(r'(?m)^port = 9099$', 'port = %d' % free_port(), f.read(), count=1)
        with open(ini, 'w', encoding='utf-8') as f:
            f.write(text)
        env = dict(os.environ, SVCMGR_CONFIG='')
        timed('svcmgr start', [svcmgr, 'start'], cwd=clone, env=env)
        started = True
        timed('svcmgr transcribe (the README\'s)', [svcmgr, 'transcribe', 'tests/fixtures/en_hello.wav'], cwd=clone)
        folder = os.path.join(clone, 'tests', 'fixtures', 'copies')
        os.makedirs(folder)
        fixtures = sorted(glob.glob(os.path.join(clone, 'tests', 'fixtures', 'en_*.wav')))
        for i in range(args.files):
            shutil.copy(fixtures[i % len(fixtures)], os.path.join(folder, 'call%04d.wav' % i))
        start = time.perf_counter()
        status, shown = on_pty([svcmgr, 'transcribe', '--out', 'out', '--format', 'json', 'tests/fixtures/copies'],
                               clone)
        secs = time.perf_counter() - start
        bars = [part for part in re.split(r'\r\x1b\[K', shown) if 'files/s' in part]
        codes = collections.Counter()
        for path in glob.glob(os.path.join(clone, 'out', '*.json')):
            with open(path, encoding='utf-8') as f:
                codes[re.search(r'"result": "(\d)"', f.read()).group(1)] += 1
        print('svcmgr transcribe %d copies        %7.1f s  exit %d  %.1f files/s' % (
            args.files, secs, status, args.files / secs))
        print('  progress lines drawn: %d; last: %s' % (len(bars), bars[-1].strip() if bars else '-'))
        print('  summary: %s' % [line for line in shown.splitlines() if 'file(s):' in line])
        print('  outputs by result: %s; lines with "ERROR 6": %d' % (dict(codes), shown.count('ERROR 6')))
    finally:
        if started:
            timed('svcmgr stop', [svcmgr, 'stop'], cwd=clone, env=dict(os.environ, SVCMGR_CONFIG=''))
        if args.keep_tmp:
            print('kept', tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
