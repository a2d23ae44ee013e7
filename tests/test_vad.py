"""The VAD gate (_vad.py): what reaches the engine, times mapped back to the source, and
accuracy on the call sets of tests/callsets.py with the gate on versus off (jiwer)."""
import os
import wave

import jiwer
import numpy as np
import pytest

import _audio
import _engine
import _vad
import callsets
from conftest import FIXTURES

RATE = 16000


@pytest.fixture(scope='module')
def sphinx():
    engine = _engine.PocketSphinxEngine()
    engine.load()
    return engine


@pytest.fixture(scope='module')
def calls(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('calls'))
    # The whole mono set (3 calls, 255 s): on its first call (125 words), a word more or
    # less at one join moves its WER by 0.8 points, more than the bound.
    return {'stereo': callsets.make(folder, 'stereo', 1), 'mono': callsets.make(folder, 'mono')}


def speech(name='en_hello.wav'):
    pcm = _audio.prepare(os.path.join(FIXTURES, name), RATE).engine_pcm[0]
    return np.frombuffer(pcm, dtype='<i2').astype(np.float64)


def audible_end(samples, floor_dbfs=-50.0):
    """Where the last 10 ms louder than floor_dbfs ends (a recording's silent tail,
    quieter than the hiss the tests add, is not part of its voice)."""
    levels = _vad._frame_levels(samples, 160)
    return (int(np.nonzero(levels >= floor_dbfs)[0][-1]) + 1) * 160


def pcm_of(samples):
    return np.clip(samples, -32768, 32767).astype('<i2').tobytes()


def noisy_silence(seconds, seed=0):
    return np.random.default_rng(seed).normal(0, 60, int(seconds * RATE))


def test_only_speech_reaches_the_engine_and_times_map_back(sphinx):
    voice = speech()
    signal = noisy_silence(12.0)
    at = int(6.5 * RATE)
    signal[at:at + len(voice)] += voice
    gated, = _vad.gate([pcm_of(signal)], RATE, _vad.VadSettings())
    assert gated.kept_share < 0.5
    (dst, src, length), = gated.spans
    # The fixture ends in 0.11 s at -60 dBFS, under the hiss: that tail may be left out.
    assert src <= at and src + length >= at + audible_end(voice) > at + len(voice) - 0.15 * RATE
    assert gated.to_source(dst + 100) == src + 100
    alone = sphinx.recognize(pcm_of(voice))
    assert alone.text == 'hello customer how can i help you'
    rec, = _vad.recognize(sphinx, [pcm_of(signal)], _vad.VadSettings())
    ungated, = _vad.recognize(sphinx, [pcm_of(signal)], _vad.VadSettings(enabled=False))
    # Six seconds of hiss before the words throw pocketsphinx off; the gate spares it that.
    assert jiwer.wer(alone.text, rec.text) <= jiwer.wer(alone.text, ungated.text)
    assert rec.words[0].word == 'hello'
    assert rec.words[0].start == pytest.approx(alone.words[0].start + 6.5, abs=0.15)
    for word in rec.words:
        assert 6.5 - 0.15 <= word.start < word.end <= 6.5 + len(voice) / RATE + 0.15


def test_kept_parts_are_heard_with_the_channels_mean(sphinx):
    signal = noisy_silence(8.0, 3)
    voice = speech()
    signal[RATE:RATE + len(voice)] += voice
    whole = pcm_of(signal)
    # The mean held fixed in live mode gives the features of a batch decode: on the whole
    # channel, the very words, times and confidences of recognize().
    assert sphinx.recognize_kept(whole, whole) == sphinx.recognize(whole)
    whole_mean = sphinx._batch_cmn(whole)
    # Left-out audio up to a quarter of the kept: the whole channel's mean, as without the gate.
    most = pcm_of(signal[:int(6.5 * RATE)])
    assert sphinx._kept_cmn(most, whole) == whole_mean
    # More (hiss, 3x the kept here) counts only that much: c0 between the two.
    part = pcm_of(signal[RATE // 2:RATE + len(voice) + RATE // 2])
    c0 = [float(m.split(',')[0]) for m in (sphinx._batch_cmn(part), sphinx._kept_cmn(part, whole), whole_mean)]
    assert c0[0] > c0[1] > c0[2] or c0[0] < c0[1] < c0[2]


def test_silence_gives_no_engine_input(sphinx):
    gated, = _vad.gate([pcm_of(noisy_silence(5.0))], RATE, _vad.VadSettings())
    assert gated.pcm == b'' and gated.spans == []
    rec, = _vad.recognize(sphinx, [pcm_of(noisy_silence(5.0))], _vad.VadSettings())
    assert (rec.text, rec.words) == ('', [])


def test_crosstalk_on_the_silent_channel_is_dropped():
    voice = speech()
    a = noisy_silence(6.0, 1)
    b = noisy_silence(6.0, 2)
    a[RATE:RATE + len(voice)] += voice
    b[RATE + 320:RATE + 320 + len(voice)] += 0.1 * voice[:len(b) - RATE - 320]   # -20 dB echo
    channels = [pcm_of(a), pcm_of(b)]
    on = _vad.gate(channels, RATE, _vad.VadSettings(crosstalk_db=15))
    off = _vad.gate(channels, RATE, _vad.VadSettings(crosstalk_db=0))
    assert on[0].kept_share > 0.3
    assert on[1].kept_share == 0
    assert off[1].kept_share > 0.2      # the echo alone is loud enough to pass the VAD


def test_other_rates_pass_ungated():
    with pytest.raises(ValueError):
        _vad.gate([b'\0\0' * 1000], 22050, _vad.VadSettings())


def test_call_sets_accuracy_with_and_without_vad(sphinx, calls):
    off_speech = {False: [0, 0], True: [0, 0]}
    wer = {}
    for name in ('stereo', 'mono'):
        refs, hyps = {False: [], True: []}, {False: [], True: []}
        for call in calls[name]:
            prepared = _audio.prepare(call.path, sphinx.sample_rate)
            assert len(prepared.engine_pcm) == call.channels
            for enabled in (False, True):
                recs = _vad.recognize(sphinx, prepared.engine_pcm, _vad.VadSettings(enabled=enabled))
                for label, rec in zip('AB', recs):
                    refs[enabled].append(call.said[label])
                    hyps[enabled].append(rec.text)
                off, total = callsets.words_off_speech(call, recs)
                off_speech[enabled][0] += off
                off_speech[enabled][1] += total
        wer[name] = {k: jiwer.wer(refs[k], hyps[k]) for k in (False, True)}
    print('WER without/with VAD %s; words off speech %s' % (wer, off_speech))
    # Issue 17: with the gate, at most 0.5 points of WER more than without, on both sets.
    # pocketsphinx with deterministic = true gives the same words on every run. Before the
    # kept parts were heard with the channel's cepstral mean, one mono call measured +1.6
    # points; on the mono set, 27.9 % without the gate and 27.2 % with it (2026-12-01).
    assert wer['stereo'][True] <= wer['stereo'][False] + 0.005
    assert wer['mono'][True] <= wer['mono'][False] + 0.005
    # Times stay on the speech: at most 2 % of the words more than 0.15 s away from it.
    off, total = off_speech[True]
    assert total > 100 and off <= 0.02 * total
    assert off / total <= off_speech[False][0] / off_speech[False][1]


def test_call_sets_are_what_they_say(calls):
    stereo, mono = calls['stereo'][0], calls['mono'][0]
    assert 60 <= stereo.seconds <= 300 and 60 <= mono.seconds <= 300
    assert 0.2 <= callsets.silence_share(mono) <= 0.4
    assert {t['channel'] for t in stereo.turns} == {'A', 'B'}
    gaps = [b['start'] - a['end'] for a, b in zip(stereo.turns, stereo.turns[1:])]
    assert min(gaps) >= 0.3 and max(gaps) <= 12     # 0.3 .. 3 s gaps, holds up to 12 s
    with wave.open(stereo.path) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), '<i2').reshape(-1, 2).astype(float)
    # While A speaks, B carries A's cross-talk over its own noise floor.
    first = stereo.turns[0]
    span = slice(int(first['start'] * 8000), int(first['end'] * 8000))
    other = 1 if first['channel'] == 'A' else 0
    level = np.sqrt(np.mean(frames[span, other] ** 2))
    assert callsets.NOISE_RMS * 1.2 < level < np.sqrt(np.mean(frames[span, 1 - other] ** 2)) / 10


def test_pauses_the_gate_shortened_still_end_utterances(sphinx):
    # Three sentences 1 s apart: padded by 0.1 s, the engine hears 0.2 s pauses, too short
    # to end an utterance; on the source's timeline they are 1 s and do.
    prepared = _audio.prepare(os.path.join(FIXTURES, 'three_sentences.wav'), sphinx.sample_rate)
    whole, = prepared.engine_pcm
    alone = sphinx.recognize(whole)
    assert len(alone.utterances) == 3
    rec, = _vad.recognize(sphinx, [whole], _vad.VadSettings(padding_secs=0.1))
    assert [u.text for u in rec.utterances] == [u.text for u in alone.utterances]
    for u, a in zip(rec.utterances, alone.utterances):
        assert u.start == pytest.approx(a.start, abs=0.15) and u.end == pytest.approx(a.end, abs=0.15)
        assert u.text == ' '.join(w.word for w in u.words)


def test_less_padding_after_a_region_than_before():
    # The VAD finds the end of speech closely but misses quiet onsets: a region keeps
    # padding_secs before and padding_after_secs after.
    voice = speech()
    signal = noisy_silence(12.0)
    at = int(6.5 * RATE)
    signal[at:at + len(voice)] += voice
    flags, frame = _vad.speech_flags([pcm_of(signal)], RATE, _vad.VadSettings())
    (first, end), = _vad._runs(flags[0])
    settings = _vad.VadSettings(padding_secs=0.3, padding_after_secs=0.12)
    (start, stop), = _vad.regions(flags[0], frame, len(signal), RATE, settings)
    assert (first * frame - start, stop - end * frame) == (int(0.3 * RATE), int(0.12 * RATE))
    assert _vad.VadSettings().padding_after_secs < _vad.VadSettings().padding_secs


def test_a_word_heard_across_a_join_stays_in_one_region():
    # Regions at 1.0-2.0 s and 5.0-6.0 s of the source, back to back for the engine: a word
    # the engine heard from 0.9 to 1.3 s lies mostly in the second, from 5.0 s on.
    gated = _vad.Gated(b'', [(0, RATE, RATE), (RATE, 5 * RATE, RATE)], 8 * RATE)
    words = [_engine.Word('one', 0.2, 0.6), _engine.Word('two', 0.9, 1.3), _engine.Word('three', 1.4, 1.7)]
    rec = _vad._remap(_engine.Recognition('one two three', _engine.utterances_of(words)), gated, RATE)
    assert [(w.word, w.start, w.end) for w in rec.words] == [
        ('one', 1.2, 1.6), ('two', 5.0, 5.3), ('three', 5.4, 5.7)]


def test_onset_moves_back_only_as_far_as_the_lenient_vad_hears_voice():
    # Two "hello"s: the first region keeps vad_padding_secs (nothing leads into it in the
    # engine's stream); the second starts vad_lead_secs before where VAD mode 0 hears voice.
    voice = speech()
    signal = noisy_silence(14.0, 4)
    at = (int(2.0 * RATE), int(9.0 * RATE))
    for a in at:
        signal[a:a + len(voice)] += voice
    pcm = pcm_of(signal)
    fixed = _vad.VadSettings(onset_aggressiveness=-1)
    onset = _vad.VadSettings()      # the default: mode 0, 0.1 s of lead
    assert (onset.onset_aggressiveness, onset.lead_secs) == (0, 0.1)
    strict, frame = _vad.speech_flags([pcm], RATE, fixed)
    firsts = [first * frame for first, _ in _vad._runs(strict[0])]
    assert len(firsts) == 2
    gated, = _vad.gate([pcm], RATE, onset)
    (_, src1, _), (_, src2, _) = gated.spans
    assert src1 == firsts[0] - int(0.3 * RATE)
    lenient = _vad._vad_flags(pcm, RATE, fixed, len(strict[0]), 0)
    heard = firsts[1] // frame
    while lenient[heard - 1]:
        heard -= 1
    assert src2 == heard * frame - int(0.1 * RATE)
    assert firsts[1] - int(0.3 * RATE) < src2 <= at[1] + int(0.1 * RATE)
    assert gated.kept_share < _vad.gate([pcm], RATE, fixed)[0].kept_share
