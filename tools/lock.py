#!/usr/bin/env python3
"""Lock files with hashes: requirements*.lock compiled from requirements*.txt by
`uv pip compile --generate-hashes` (every transitive package pinned and hashed), so an
install with `pip install --require-hashes -r X.lock` gets exactly what was tested.

Each lock starts with the sha256 of every input file it was compiled from; `--check`
(offline, what tests/test_packaging.py runs) fails when an input changed since, or when a
version pinned in an input differs from the lock's.

Usage: .venv/bin/python tools/lock.py           # recompile every lock (needs uv and the index)
       .venv/bin/python tools/lock.py --check   # exit 1, one line per stale lock
"""
import hashlib
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = ('requirements.txt', 'requirements-vosk.txt', 'requirements-test.txt')
PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)', re.M)
STAMP = re.compile(r'^# input sha256 (\S+): ([0-9a-f]{64})$', re.M)


def lock_name(name):
    return name[:-len('.txt')] + '.lock'


def inputs_of(name, root=ROOT):
    """The file and every file it includes with -r, in order."""
    out = [name]
    with open(os.path.join(root, name), encoding='utf-8') as f:
        for line in f:
            m = re.match(r'\s*-r\s+(\S+)', line)
            if m and m.group(1) not in out:
                out += [n for n in inputs_of(m.group(1), root) if n not in out]
    return out


def digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def norm(name):
    return re.sub(r'[-_.]+', '-', name).lower()


def problems(name, root=ROOT):
    """Why `name`'s lock is out of date with its inputs (empty when it is not)."""
    lock = os.path.join(root, lock_name(name))
    fix = 'run .venv/bin/python tools/lock.py'
    if not os.path.isfile(lock):
        return ['%s is missing: %s' % (lock_name(name), fix)]
    with open(lock, encoding='utf-8') as f:
        text = f.read()
    stamps = dict(STAMP.findall(text))
    out = []
    for source in inputs_of(name, root):
        if stamps.get(source) != digest(os.path.join(root, source)):
            out.append('%s is out of date with %s: %s' % (lock_name(name), source, fix))
    locked = {norm(n): v for n, v in PIN.findall(text)}
    for source in inputs_of(name, root):
        with open(os.path.join(root, source), encoding='utf-8') as f:
            for pkg, version in PIN.findall(f.read()):
                if locked.get(norm(pkg)) != version:
                    out.append('%s has %s %s, %s pins %s: %s' % (
                        lock_name(name), pkg, locked.get(norm(pkg), '(nothing)'), source, version, fix))
    unhashed = [n for n, _ in PIN.findall(text) if not re.search(r'^%s==\S+ \\\n\s+--hash=sha256:' % re.escape(n),
                                                                 text, re.M)]
    if unhashed:
        out.append('%s: no hash for %s: %s' % (lock_name(name), ', '.join(unhashed), fix))
    return out


def compile_lock(name):
    uv = os.path.join(os.path.dirname(sys.executable), 'uv')
    body = subprocess.run([uv, 'pip', 'compile', name, '--generate-hashes', '--python-version', '3.11',
                           '--no-header'], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    head = ['# Compiled from %s by tools/lock.py (uv pip compile --generate-hashes); do not edit.' % name,
            '# Install: pip install --require-hashes -r %s' % lock_name(name)]
    head += ['# input sha256 %s: %s' % (source, digest(os.path.join(ROOT, source))) for source in inputs_of(name)]
    with open(os.path.join(ROOT, lock_name(name)), 'w', encoding='utf-8') as f:
        f.write('\n'.join(head) + '\n' + body)


def main(argv):
    if '--check' in argv:
        found = [line for name in INPUTS for line in problems(name)]
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    for name in INPUTS:
        compile_lock(name)
        print('wrote %s' % lock_name(name))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
