"""What paths checked at the time of use cost a job: the file-system calls of one task done
through _safepath (source walked from its root and opened, audioPath walked and made,
four outputs created as temps and renamed in, the source removed only if still the same
file) against the same calls on plain paths, as the daemon did before; then that cost
next to one real conversion (_audio.prepare of a short fixture with its MP3), and the
master's sweep of a reaped worker's temp names.

Usage: .venv/bin/python bench/safepath.py [--jobs 5000] [--depth 4]
Works in a temporary folder; prints figures, asserts nothing.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import _audio  # noqa: E402  (needs ROOT on the path first)
import _scanner  # noqa: E402
import _worker  # noqa: E402
from _jobs import Job  # noqa: E402

NAMES = ('.wav', '_A.wav', '_B.wav', '.mp3')


def plain_job(src_dir, out_dir, i):
    path = os.path.join(src_dir, 'call%d.wav' % i)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.readlink('/proc/self/fd/%d' % fd)
    os.fstat(fd)
    os.makedirs(out_dir, exist_ok=True)
    for suffix in NAMES:
        tmp = os.path.join(out_dir, '.s%d%s.%d.tmp' % (i, suffix, os.getpid()))
        with open(tmp, 'wb'):
            pass
        os.replace(tmp, os.path.join(out_dir, 's%d%s' % (i, suffix)))
    os.close(fd)
    os.unlink(path)


def safe_job(src_dir, out_dir, roots, i):
    job = Job(speech_id='s%d' % i, candidates=[os.path.join(src_dir, 'call%d.wav' % i)], roots=roots,
              audio_path=out_dir, stem='s%d' % i)
    source = _worker.open_source(job.candidates, roots)
    with _worker.open_outputs(job) as out:
        for suffix in NAMES:
            fd, tmp = out.create_temp(job.stem + suffix)
            os.close(fd)
            if not out.is_same(job.stem + suffix, source.st):
                out.replace(tmp, job.stem + suffix)
    source.folder.unlink(source.name, expect=source.st)
    source.close()


def plain_walk(root):
    """The scanner's walk as it was: os.scandir by path."""
    count, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    entry.stat(follow_symlinks=False)
                    count += 1
    return count


def walks(base, folders=100, per_folder=100):
    """(plain, _scanner.Walker) seconds for one pass over folders x per_folder files, two levels deep
    (the Walker also filters names, as the scanner does)."""
    root = os.path.join(base, 'drop')
    for f in range(folders):
        sub = os.path.join(root, 'g%d' % (f % 10), 'f%d' % f)
        os.makedirs(sub)
        for i in range(per_folder):
            with open(os.path.join(sub, 'c%d.wav' % i), 'wb') as out:
                out.write(b'x')
    walker = _scanner.Walker(root, extensions=['wav'])
    best = [float('inf'), float('inf')]
    for _ in range(3):
        for k, fn in enumerate((lambda: plain_walk(root), walker.walk)):
            started = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - started)
    return best


def run(kind, jobs, depth, base):
    root = os.path.join(base, kind)
    sub = os.path.join(root, *['d%d' % k for k in range(depth)])
    src_dir, out_dir = os.path.join(sub, 'src'), os.path.join(sub, 'out')
    os.makedirs(src_dir)
    for i in range(jobs):
        with open(os.path.join(src_dir, 'call%d.wav' % i), 'wb') as f:
            f.write(b'x')
    started = time.perf_counter()
    for i in range(jobs):
        if kind.startswith('plain'):
            plain_job(src_dir, out_dir, i)
        else:
            safe_job(src_dir, out_dir, [root], i)
    return (time.perf_counter() - started) / jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--jobs', type=int, default=5000)
    ap.add_argument('--depth', type=int, default=4, help='folders between the root and the files')
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix='bench-safepath-')
    try:
        # Alternated, two rounds each, the better of each kept: neither gets a warmer cache.
        plain, safe = [], []
        for r in range(2):
            plain.append(run('plain%d' % r, args.jobs, args.depth, base))
            safe.append(run('safe%d' % r, args.jobs, args.depth, base))
        plain, safe = min(plain), min(safe)
        out = os.path.join(base, 'conv')
        fixture = os.path.join(ROOT, 'tests', 'fixtures', 'en_hello.wav')
        _audio.prepare(fixture, 16000, out, 'warm', mp3_backup=True)
        n = 20
        started = time.perf_counter()
        for i in range(n):
            seconds = _audio.prepare(fixture, 16000, out, 'c%d' % i, mp3_backup=True).duration
        convert = (time.perf_counter() - started) / n
        job = Job(speech_id='x', candidates=[], roots=[base], audio_path=out, stem='x')
        started = time.perf_counter()
        for _ in range(args.jobs):
            _worker.remove_job_temps(job, 999999)
        sweep = (time.perf_counter() - started) / args.jobs
        walk_plain, walk_safe = walks(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print('file-system calls of one job, %d jobs, %d folders below the root:' % (args.jobs, args.depth + 2))
    print('  plain paths (before):     %8.1f us/job' % (plain * 1e6))
    print('  _safepath walk (after):   %8.1f us/job   (%+.1f us, x%.2f)' % (safe * 1e6, (safe - plain) * 1e6,
                                                                         safe / plain))
    print('  one conversion (en_hello.wav, %.1f s of audio, WAV + MP3): %.1f ms' % (seconds, convert * 1e3))
    print('  added cost / conversion:  %+.3f %%' % (100 * (safe - plain) / convert))
    print('  master sweep of a reaped worker\'s temp names: %.1f us' % (sweep * 1e6))
    print('scanner pass over 10,000 files in 100 folders: plain scandir %.1f ms, Walker (folder fds) %.1f ms (x%.2f)'
          % (walk_plain * 1e3, walk_safe * 1e3, walk_safe / walk_plain))


if __name__ == '__main__':
    main()
