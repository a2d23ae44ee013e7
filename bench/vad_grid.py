#!/usr/bin/env python3
"""The VAD gate's settings against each other, pocketsphinx, in one run on the call sets of
tests/callsets.py (the same files as bench/speed.py):

1. where the kept audio comes from, per set: the speech of the script (turn times), the
   frames WebRTC's VAD calls speech, those above vad_min_dbfs, after bridging and after
   padding (defaults of _vad.VadSettings);
2. for each setting of a grid (padding before/after, bridge, aggressiveness, min_dbfs): kept share,
   engine CPU with the gate vs without (the ungated decode made once per call), WER with
   and without (jiwer), and the share of words more than 0.15 s off the speech.

With --paired the ungated decode is made again beside each setting (twice the time), for
CPU ratios on a machine whose load changes during the run.

Usage: .venv/bin/python bench/vad_grid.py [--calls N] [--sets stereo,mono] [--grid small|full|padding|onset]
       [--paired] [--first N]
"""
import argparse
import itertools
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import jiwer  # noqa: E402

import _audio  # noqa: E402
import _engine  # noqa: E402
import _vad  # noqa: E402
import callsets  # noqa: E402

CALLS = os.path.join(tempfile.gettempdir(), 'svcmgr-callsets')


def grid(kind):
    """[VadSettings]: the defaults first."""
    out = [_vad.VadSettings()]
    # (padding before, after, bridge, aggressiveness, min_dbfs)
    if kind == 'onset':
        # (onset mode, lead, after, bridge): the strict regions' starts moved back by a lenient VAD
        for mode, lead, after, bridge in ((0, 0.1, 0.12, 0.5), (0, 0.14, 0.12, 0.5), (0, 0.06, 0.12, 0.5),
                                          (0, 0.1, 0.06, 0.5), (1, 0.1, 0.12, 0.5), (0, 0.1, 0.12, 0.3)):
            out.append(_vad.VadSettings(onset_aggressiveness=mode, lead_secs=lead, padding_after_secs=after,
                                        bridge_secs=bridge))
        return out
    if kind == 'padding':
        axes = [(0.3, 0.3, 0.5, 2, -45), (0.3, 0.12, 0.5, 2, -45), (0.3, 0.12, 0.5, 3, -45),
                (0.1, 0.1, 0.2, 2, -45)]
    elif kind == 'full':
        axes = [(p, p, b, a, d) for p, b, a, d in
                itertools.product((0.1, 0.2, 0.3), (0.2, 0.3, 0.5), (2, 3), (-45, -40))]
    else:
        axes = [(p, p, b, 2, -45) for p in (0.1, 0.2, 0.3) for b in (0.2, 0.3, 0.5)]
        axes += [(p, p, b, 3, -45) for p, b in ((0.3, 0.5), (0.2, 0.3), (0.1, 0.2))]
        axes += [(p, p, b, 2, -40) for p, b in ((0.3, 0.5), (0.2, 0.3), (0.1, 0.2))]
        axes += [(0.3, 0.12, 0.5, 2, -45), (0.3, 0.12, 0.5, 3, -45)]
    for before, after, bridge, aggressiveness, min_dbfs in axes:
        s = _vad.VadSettings(padding_secs=before, padding_after_secs=after, bridge_secs=bridge,
                             aggressiveness=aggressiveness, min_dbfs=min_dbfs)
        if s != out[0]:
            out.append(s)
    return out


def label(s):
    onset = ' onset m%d lead %.2f' % (s.onset_aggressiveness, s.lead_secs) if s.onset_aggressiveness >= 0 else ''
    return 'pad %.1f/%.2f bridge %.1f aggr %d dbfs %3.0f%s' % (
        s.padding_secs, s.padding_after_secs, s.bridge_secs, s.aggressiveness, s.min_dbfs, onset)


def _share(flags):
    return float(np.mean(flags)) if len(flags) else 0.0


def breakdown(calls, rate):
    """Shares of the audio at each step of the gate, defaults, summed over channels."""
    s = _vad.VadSettings()
    frame = rate * s.frame_ms // 1000
    sums = np.zeros(6)
    total = 0
    for call in calls:
        prepared = _audio.prepare(call.path, rate)
        arrays = [np.frombuffer(p, dtype='<i2') for p in prepared.engine_pcm]
        n = min(len(a) for a in arrays) // frame
        spoken = np.zeros((len(arrays), n), dtype=bool)
        for t in call.turns:
            ch = 'AB'.index(t['channel'])
            spoken[ch, int(t['start'] * rate) // frame:int(t['end'] * rate) // frame + 1] = True
        final, _ = _vad.speech_flags(prepared.engine_pcm, rate, s)
        for index, pcm in enumerate(prepared.engine_pcm):
            vad = _vad._vad_flags(pcm, rate, s, n)
            loud = _vad._frame_levels(arrays[index], frame)[:n] >= s.min_dbfs
            bridged = _vad._smooth(vad & loud, s)
            onset = _vad.onset_flags(pcm, rate, s, n)
            kept = sum(b - a for a, b in _vad.regions(final[index], frame, n * frame, rate, s, onset)) / frame
            sums += n * np.array([_share(spoken[index]), _share(vad), _share(loud), _share(vad & loud),
                                  _share(bridged), kept / n])
            total += n
    return sums / total


def run_set(engine, calls, settings, paired=False):
    rate = engine.sample_rate
    prepared = [_audio.prepare(c.path, rate) for c in calls]
    audio = sum(p.duration * len(p.engine_pcm) for p in prepared)
    refs = [c.said[ch] for c in calls for ch in 'AB'[:c.channels]]

    def decode(s):
        cpu, hyps, kept, off, words = 0.0, [], 0.0, 0, 0
        for call, p in zip(calls, prepared):
            if s.enabled:
                for g in _vad.gate(p.engine_pcm, rate, s):
                    kept += g.kept_share * g.source_samples / rate
            t = time.process_time()
            recs = _vad.recognize(engine, p.engine_pcm, s)
            cpu += time.process_time() - t
            hyps.extend(r.text for r in recs)
            n_off, n_words = callsets.words_off_speech(call, recs)
            off, words = off + n_off, words + n_words
        return cpu, jiwer.wer(refs, hyps), kept / audio, off / max(1, words)

    off_settings = _vad.VadSettings(enabled=False)
    base_cpu, base_wer, _, base_off = decode(off_settings)
    print('  no gate %60s  kept 100.0 %%  CPU/audio s %.4f            WER %5.1f %%          off %.1f %%'
          % ('', base_cpu / audio, 100 * base_wer, 100 * base_off), flush=True)
    for i, s in enumerate(settings):
        if paired:
            # The ungated decode again beside this one, in turns, so both see the same load.
            first, second = (off_settings, s) if i % 2 else (s, off_settings)
            a, b = decode(first), decode(second)
            (base_cpu, _, _, _), (cpu, wer, kept, off) = (a, b) if i % 2 else (b, a)
        else:
            cpu, wer, kept, off = decode(s)
        print('  %-68s kept %5.1f %%  CPU/audio s %.4f ratio %.2fx  WER %5.1f %% (%+.1f)  off %.1f %%'
              % (label(s), 100 * kept, cpu / audio, cpu / base_cpu, 100 * wer, 100 * (wer - base_wer),
                 100 * off), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--calls', type=int, default=2, help='calls per set')
    ap.add_argument('--sets', default='mono,stereo')
    ap.add_argument('--grid', default='small', choices=('small', 'full', 'padding', 'onset'))
    ap.add_argument('--paired', action='store_true',
                    help='decode without the gate again beside each setting (CPU ratios under changing load)')
    ap.add_argument('--first', type=int, help='only the first N settings of the grid')
    args = ap.parse_args()
    engine = _engine.PocketSphinxEngine()
    engine.load()
    settings = grid(args.grid)[:args.first]
    for name in args.sets.split(','):
        calls = callsets.make(CALLS, name, args.calls)
        audio = sum(c.seconds * c.channels for c in calls)
        print('set %s: %d calls, %.0f channel-s, silence %s' % (
            name, len(calls), audio, ' '.join('%.0f%%' % (100 * callsets.silence_share(c)) for c in calls)))
        shares = breakdown(calls, engine.sample_rate)
        print('  shares of the audio (defaults): script speech %.1f %%, VAD speech %.1f %%, above min_dbfs'
              ' %.1f %%, both %.1f %%, bridged %.1f %%, kept (padded) %.1f %%' % tuple(100 * shares))
        run_set(engine, calls, settings, args.paired)


if __name__ == '__main__':
    main()
