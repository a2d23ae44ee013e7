#!/usr/bin/env python3
"""Speed figures of issue 17, each a ratio measured in this one run on the same files and
the same model (call sets made by tests/callsets.py):

1. engine CPU per audio second with the VAD gate vs without, pocketsphinx, on the stereo
   set (target <= 0.6x) and the mono set (target <= 0.8x), with word error rates (jiwer);
   the same for Vosk Korean on its stereo set, with a recognizer per call and kept;
2. throughput of the daemon with Vosk on 2 workers, everything on (VAD, kept recognizers,
   lameenc), against the way vosk-server and 2.0 work (every sample through the engine, one
   recognizer per call, PyAV's MP3 encoder), on the Korean stereo set (target >= 1.5x);
3. per-call CPU for 10 s Korean calls with the recognizer kept vs made per call, and the
   worker's private memory after a run of calls each way;
4. MP3 CPU per audio second, PyAV's libmp3lame vs lameenc, with each one's SNR.

Usage: .venv/bin/python bench/speed.py [--calls N] [--reps N] [--rounds N] [--skip engine,vosk,daemon,reuse,mp3]
"""
import argparse
import os
import sys
import tempfile
import time
import wave

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# bench/http.py would stand for the standard library's http (vosk imports requests).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import jiwer  # noqa: E402

import _audio  # noqa: E402
import _engine  # noqa: E402
import _mp3  # noqa: E402
import _speed  # noqa: E402
import _vad  # noqa: E402
import callsets  # noqa: E402
from conftest import Daemon, transcribe_req  # noqa: E402

CALLS = os.path.join(tempfile.gettempdir(), 'svcmgr-callsets')


def engine_cpu(engine, calls, label, reps=2):
    """Alternates VAD off and on per call, `reps` times in turn (off first, then on first),
    so both see the same machine load; words are those of the first pass."""
    on = _vad.VadSettings()
    off = _vad.VadSettings(enabled=False)
    cpu = {False: 0.0, True: 0.0}
    refs, hyps = {False: [], True: []}, {False: [], True: []}
    audio = kept = 0.0
    for call in calls:
        prepared = _audio.prepare(call.path, engine.sample_rate)
        audio += prepared.duration * len(prepared.engine_pcm)
        for gated in _vad.gate(prepared.engine_pcm, engine.sample_rate, on):
            kept += gated.kept_share * gated.source_samples / engine.sample_rate
        for rep in range(reps):
            for settings in (off, on) if rep % 2 == 0 else (on, off):
                t = time.process_time()
                recs = _vad.recognize(engine, prepared.engine_pcm, settings)
                cpu[settings.enabled] += time.process_time() - t
                if rep > 0:
                    continue
                for channel, rec in zip('AB', recs):
                    refs[settings.enabled].append(call.said[channel])
                    hyps[settings.enabled].append(rec.text)
    wer = {k: jiwer.wer(refs[k], hyps[k]) for k in cpu}
    cer = {k: jiwer.cer(refs[k], hyps[k]) for k in cpu}
    print('%-22s %6.0f audio s  VAD keeps %4.1f %%  engine CPU/audio s off %.4f on %.4f  ratio %.2fx'
          % (label, audio, 100 * kept / audio, cpu[False] / audio / reps, cpu[True] / audio / reps,
             cpu[True] / cpu[False]))
    print('%-22s WER off %.1f %% on %.1f %% (%+.1f)   CER off %.1f %% on %.1f %%'
          % ('', 100 * wer[False], 100 * wer[True], 100 * (wer[True] - wer[False]),
             100 * cer[False], 100 * cer[True]))


def daemon_run(base, calls, everything_on):
    d = Daemon(base, workers=2, max_tasks=len(calls) + 10, timeout=3600, roots='/', engine='vosk',
               model='ko', mp3='true')
    # Under [engine]: appended at the end, the keys would land in the [http] section.
    keys = ('vad = %s\nkeep_recognizer = %s\n' % (('true',) * 2 if everything_on else ('false',) * 2))
    d.write_ini()
    with open(d.ini) as f:
        text = f.read()
    assert text.count('[engine]\n') == 1
    with open(d.ini, 'w') as f:
        f.write(text.replace('[engine]\n', '[engine]\n' + keys).replace(
            'mp3_backup = true', 'mp3_backup = true\nmp3_encoder = %s' % ('lameenc' if everything_on else 'pyav')))
    d.start()
    try:
        client = d.client(timeout=3600)
        t = time.perf_counter()
        for i, call in enumerate(calls):
            client.send(1002, transcribe_req(os.path.dirname(call.path), os.path.basename(call.path),
                                             sid='speed%d%d' % (everything_on, i)))
        answers = client.recv_n(len(calls), timeout=3600)
        wall = time.perf_counter() - t
        client.close()
    finally:
        d.stop()
    bad = [body for _, body in answers if str(body.get('result')) != '0']
    if bad:
        raise SystemExit('daemon answered with errors: %s' % bad[:2])
    return wall


def daemon_throughput(calls, rounds):
    audio = sum(c.seconds for c in calls)
    walls = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):
                walls[on].append(daemon_run(os.path.join(tmp, 'r%d%d' % (r, on)), calls, on))
    old, new = sum(walls[False]), sum(walls[True])
    print('daemon, vosk ko, 2 workers, %d stereo calls (%.0f s of calls) x %d round(s):' % (len(calls), audio, rounds))
    print('  today (no VAD, recognizer per call, pyav MP3): %.1f s wall, %.2f call-s/s'
          % (old / rounds, audio * rounds / old))
    print('  everything on (VAD, kept recognizer, lameenc): %.1f s wall, %.2f call-s/s   throughput %.2fx'
          % (new / rounds, audio * rounds / new, old / new))


def recognizer_reuse(calls, repeats):
    engine = _engine.VoskEngine('ko')
    engine.load()
    pcms = []
    for call in calls:
        pcms.extend(_audio.prepare(call.path, engine.sample_rate).engine_pcm)
    cpu = {False: [], True: []}
    for rep in range(repeats):
        for keep in (False, True) if rep % 2 == 0 else (True, False):
            engine.keep_recognizer, engine._kept = keep, None
            if keep:
                engine.recognize(pcms[0])      # the kept one exists already in a worker that ran a task
            for pcm in pcms:
                t = time.process_time()
                engine.recognize(pcm)
                cpu[keep].append(time.process_time() - t)
    per_call = {k: 2 * sum(v) / len(v) for k, v in cpu.items()}     # two channels make a call
    print('10 s calls (%d channels x %d): CPU per call, recognizer made per call %.3f s, kept %.3f s   ratio %.2fx'
          % (len(pcms), repeats, per_call[False], per_call[True], per_call[True] / per_call[False]))
    engine._kept = None


def reuse_memory(calls, n):
    """Private memory of a fresh process after n varied calls, each way (forks, so the
    model's pages are shared as in a worker)."""
    engine = _engine.VoskEngine('ko')
    engine.load()
    pcms = []
    for call in calls:
        pcms.extend(_audio.prepare(call.path, engine.sample_rate).engine_pcm)
    out = {}
    for keep in (False, True):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            engine.keep_recognizer = keep
            before = _speed.private_mb()
            for i in range(n):
                engine.recognize(pcms[i % len(pcms)])
            os.write(w, ('%f %f' % (before, _speed.private_mb())).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 100).decode().split()
        os.close(r)
        os.waitpid(pid, 0)
        out[keep] = [float(x) for x in data]
    print('private memory after %d calls: made per call %.0f -> %.0f MB, kept %.0f -> %.0f MB (+%.0f MB;'
          ' [setting] max_worker_memory_mb bounds it)'
          % (n, out[False][0], out[False][1], out[True][0], out[True][1], out[True][1] - out[False][1]))


def _decode(path):
    with __import__('av').open(path) as c:
        arr = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    return (arr.T * 32768.0) if arr.dtype.kind == 'f' else arr.T.astype(np.float64)


def snr_db(ref, path):
    """SNR of the decoded MP3 against the source, at the lag that fits best (0 when the
    decoder dropped the encoder's delay as told)."""
    y = _decode(path)
    best = (-99.0, 0)
    for lag in range(0, 1200):
        n = min(len(ref), len(y) - lag)
        err = ref[:n] - y[lag:lag + n]
        best = max(best, (10 * np.log10((ref[:n] ** 2).sum() / max(1e-9, (err ** 2).sum())), lag))
    return best


def mp3_cost(calls, repeats):
    cpu = {'pyav': 0.0, 'lameenc': 0.0}
    audio = 0.0
    snr = {}
    with tempfile.TemporaryDirectory() as tmp:
        for call in calls:
            with wave.open(call.path) as w:
                rate, ch = w.getframerate(), w.getnchannels()
                pcm = w.readframes(w.getnframes())
            audio += len(pcm) / 2 / ch / rate * repeats
            chunk = 2 * ch * 1024
            for rep in range(repeats):
                for name in (cpu if rep % 2 == 0 else reversed(list(cpu))):
                    path = os.path.join(tmp, name + '.mp3')
                    t = time.process_time()
                    writer = _mp3.open_writer(path, ch, rate, name)
                    for i in range(0, len(pcm), chunk):
                        writer.write(pcm[i:i + chunk])
                    writer.close()
                    cpu[name] += time.process_time() - t
            ref = np.frombuffer(pcm, '<i2').reshape(-1, ch).astype(np.float64)
            for name in cpu:
                snr.setdefault(name, []).append(snr_db(ref, os.path.join(tmp, name + '.mp3')))
    for name in cpu:
        print('MP3 %-8s CPU/audio s %.5f  SNR %s dB (lag %s)' % (
            name, cpu[name] / audio, ', '.join('%.2f' % s for s, _ in snr[name]),
            ','.join(str(lag) for _, lag in snr[name])))
    print('MP3 lameenc / pyav CPU ratio %.2fx' % (cpu['lameenc'] / cpu['pyav']))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--calls', type=int, default=None, help='calls per set (default: all)')
    ap.add_argument('--rounds', type=int, default=1, help='daemon rounds, each way')
    ap.add_argument('--reps', type=int, default=2, help='engine decodes of each call, each way')
    ap.add_argument('--skip', default='', help='comma-separated: engine,vosk,daemon,reuse,mp3')
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(',')))
    sets = {name: callsets.make(CALLS, name, args.calls) for name in callsets.SETS}
    for name, calls in sets.items():
        print('set %-10s %d calls, %.0f s, silence %s' % (name, len(calls), sum(c.seconds for c in calls),
              ' '.join('%.0f%%' % (100 * callsets.silence_share(c)) for c in calls)))
    if 'engine' not in skip:
        ps = _engine.PocketSphinxEngine()
        ps.load()
        engine_cpu(ps, sets['stereo'], 'pocketsphinx stereo', args.reps)
        engine_cpu(ps, sets['mono'], 'pocketsphinx mono', args.reps)
    if 'vosk' not in skip:
        vosk = _engine.VoskEngine('ko')
        vosk.load()
        engine_cpu(vosk, sets['ko_stereo'], 'vosk ko stereo', args.reps)
        # As a worker runs it by default ([engine] keep_recognizer): without the set-up per
        # call, which costs the same with the gate and without.
        vosk.keep_recognizer = True
        vosk.recognize(b'\0\0' * vosk.sample_rate)      # the worker's first task made it
        engine_cpu(vosk, sets['ko_stereo'], 'vosk ko stereo, kept', args.reps)
        del vosk
    if 'reuse' not in skip:
        recognizer_reuse(sets['ko_short'], 3)
        reuse_memory(sets['ko_short'] + sets['ko_stereo'], 20)
    if 'mp3' not in skip:
        mp3_cost(sets['stereo'][:2] + sets['mono'][:1], 3)
    if 'daemon' not in skip:
        daemon_throughput(sets['ko_stereo'], args.rounds)


if __name__ == '__main__':
    main()
