"""The legacy engine bridge (1001/2001 login, 3001/4001 Recognize) against the real
daemon, with a scripted 1.0 engine that frames exactly as 1.0's Python 2 code did."""
import os
import wave

import pytest

from conftest import transcribe_req, wait_for
from legacy_engine import LegacyEngine, frame
from helpers import assert_records_match, monitor


@pytest.fixture
def remote(make_daemon):
    def make(**opts):
        opts.setdefault('engine', 'remote')
        opts.setdefault('workers', 2)
        opts.setdefault('mp3', 'true')
        return make_daemon(**opts).start()
    return make


def test_login_answers_0_1_2(remote, make_daemon):
    d = remote(engine_slots=1)
    first = LegacyEngine(d.port)
    assert first.start() == '0'
    assert LegacyEngine(d.port).login() == '1'                 # every slot taken
    assert LegacyEngine(d.port, name='otherengine').login() == '2'
    assert monitor(d)['engine']['sttengine'] is True
    first.close()
    wait_for(lambda: monitor(d)['engine']['sttengine'] is False, 10, 'engine gone')
    assert LegacyEngine(d.port).login() == '0'                 # the slot is free again
    embedded = make_daemon().start()
    assert LegacyEngine(embedded.port).login() == '2'


def test_round_trip_korean_transcript_byte_exact(remote):
    d = remote()
    eng = LegacyEngine(d.port)
    eng.start()
    folder, name = d.fixture('en_hello.wav')
    _, stereo = d.fixture('stereo_call.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='ko1', custom='kept'))
    c.send(1002, transcribe_req(folder, stereo, sid='ko2'))
    answers = {b['speechID']: b for _, b in c.recv_n(2, timeout=60)}
    for sid in ('ko1', 'ko2'):
        assert answers[sid]['result'] == '0' and answers[sid]['state'] == 'DONE'
        assert answers[sid]['transcript'] == '안녕하세요 고객님, %s 통화입니다' % sid
        assert answers[sid]['transcipt'] == answers[sid]['transcript']
    reqs = {r['speechID']: r for r in eng.received}
    r1 = reqs['ko1']
    assert r1['custom'] == 'kept' and r1['fileName'] == name and r1['domainCode'] == 'SG0001'
    assert r1['serverSeq'] == 1 and r1['domainSeq'] == 0 and r1['imageSeq'] == 0
    assert isinstance(r1['seq'], int) and r1['seq'] >= 1 and reqs['ko2']['seq'] != r1['seq']
    assert r1['channels'] == 1 and reqs['ko2']['channels'] == 2
    assert r1['audioWAV'] == 'ko1.wav' and r1['audioMP3'] == 'ko1.mp3'
    with wave.open(os.path.join(r1['audioPath'], r1['audioWAV'])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
    stem = os.path.join(reqs['ko2']['audioPath'], 'ko2')
    for suffix in ('_A.wav', '_B.wav'):
        with wave.open(stem + suffix) as w:
            assert (w.getframerate(), w.getnchannels()) == (8000, 1)
    assert os.path.getsize(os.path.join(r1['audioPath'], 'ko1.mp3')) > 0
    recs = assert_records_match(d, 2)
    marks = [m.split(' < ')[1] for m in recs[0]['processInterval']]
    assert marks == ['TRANSCRIBE_START', 'WORKER_PUT', 'WORKER_GET', 'WORKER_DONE', 'STT_SEND', 'STT_RECV',
                     'TRANSCRIBE_END']
    assert {r['data']['transcript'] for r in recs} == {answers['ko1']['transcript'], answers['ko2']['transcript']}


def test_body_length_counts_bytes_of_korean_frames(remote):
    """The 1.0 engine's frames carry byte lengths; a char-counted length would break here."""
    d = remote()
    eng = LegacyEngine(d.port, transcript=lambda req: '가' * 1000)
    eng.start()
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='bytes'))
    _, body = c.recv(60)
    assert body['transcript'] == '가' * 1000


def test_two_engines_share_20_tasks(remote):
    d = remote(engine_slots=2, engine_concurrency=2, max_tasks=50)
    a, b = LegacyEngine(d.port, delay=0.05), LegacyEngine(d.port, delay=0.05)
    assert a.start() == '0' and b.start() == '0'
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    for i in range(20):
        c.send(1002, transcribe_req(folder, name, sid='share%02d' % i))
    answers = [b for _, b in c.recv_n(20, timeout=120)]
    assert all(x['result'] == '0' for x in answers)
    assert len(a.received) + len(b.received) == 20
    assert len(a.received) >= 3 and len(b.received) >= 3
    assert_records_match(d, 20)


def test_engine_disconnect_reassigns_then_3(remote):
    d = remote(engine_slots=2, engine_concurrency=4)
    dropper = LegacyEngine(d.port, mode='close', close_after=1)
    dropper.start()
    keeper = LegacyEngine(d.port)
    keeper.start()          # logged in later: the least-busy tie goes to the dropper
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='moved'))
    wait_for(dropper.closed.is_set, 30, 'the first engine to drop')
    _, body = c.recv(60)
    assert [r['speechID'] for r in dropper.received] == ['moved']
    assert body['result'] == '0' and body['speechID'] == 'moved'
    assert [r['speechID'] for r in keeper.received] == ['moved']
    keeper.close()
    wait_for(lambda: monitor(d)['engine']['sttengine'] is False, 10, 'no engine')
    # the last engine drops with a task in flight: result 3
    last = LegacyEngine(d.port, mode='close', close_after=1)
    last.start()
    c.send(1002, transcribe_req(folder, name, sid='lost'))
    _, body = c.recv(60)
    assert body['result'] == '3' and body['speechID'] == 'lost'
    # no engine at all: 3 at once
    c.send(1002, transcribe_req(folder, name, sid='none'))
    _, body = c.recv(5)
    assert body['result'] == '3' and body['state'] == 'NONE'
    assert 'disconnected with 1 task(s) in flight' in d.log_text()
    assert_records_match(d, 2)


def test_silent_engine_gives_5_and_late_and_unknown_4001_are_dropped(remote):
    d = remote(timeout=2)
    eng = LegacyEngine(d.port, mode='silent')
    eng.start()
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='quiet'))
    _, body = c.recv(30)
    assert body['result'] == '5' and body['state'] == 'TIMEOUT'
    eng.send_4001({'result': '0', 'speechID': 'quiet', 'transcript': 'too late'})
    eng.send_4001({'result': '0', 'speechID': 'never-sent', 'transcript': 'who?'})
    wait_for(lambda: 'late 4001' in d.log_text() and 'unknown speechID' in d.log_text(), 10, 'both logged')
    assert monitor(d)['engine']['sttengine'] is True      # the engine stays logged in
    recs = assert_records_match(d, 1)
    assert recs[0]['data']['result'] == '5'


def test_4001_split_across_many_segments_and_1_0_spelling(remote):
    d = remote()
    eng = LegacyEngine(d.port, mode='split', key='transcipt')
    eng.start()
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='split'))
    _, body = c.recv(60)
    assert body['result'] == '0' and body['transcript'] == '안녕하세요 고객님, split 통화입니다'


def test_engine_error_passes_through(remote):
    d = remote()
    eng = LegacyEngine(d.port, result='9')
    eng.start()
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='fail'))
    _, body = c.recv(60)
    assert body['result'] == '9' and body['state'] == 'ERROR' and body['message']
    assert_records_match(d, 1)


def test_monitor_per_engine_detail(remote):
    d = remote(engine_slots=2)
    eng = LegacyEngine(d.port)
    eng.start()
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='mon'))
    c.recv(60)
    engines = {k: v for k, v in monitor(d)['engine'].items() if k.startswith('sttengine@')}
    assert len(engines) == 1
    detail = next(iter(engines.values()))
    assert detail['answered'] == 1 and detail['inflight'] == 0 and detail['loginTime'][:2] == '20'


def test_raw_1_0_login_frame_bytes(remote):
    """Byte for byte: the 1.0 engine's login frame and the answer's exact bytes."""
    import socket
    d = remote()
    s = socket.create_connection(('127.0.0.1', d.port), timeout=10)
    s.sendall(b'1001       9sttengine')
    got = b''
    while len(got) < 13:
        got += s.recv(64)
    assert got == b'2001       10'
    s.close()
    assert frame(1001, 'sttengine') == b'1001       9sttengine'


def test_segments_in_a_4001_reach_the_answer_and_the_record(remote):
    d = remote()

    def extra(req):
        if req['speechID'] == 'seg-good':
            return {'segments': [{'channel': 'B', 'start': 2.5, 'end': 4.0, 'result': '네 고객님', 'confidence': 0.3},
                                 {'channel': 'A', 'start': 0.4, 'end': 2.0, 'text': '안녕하세요',
                                  'words': [{'word': '안녕하세요', 'start': 0.4, 'end': 2.0, 'conf': 0.9}]}]}
        return {'segments': [{'start': 'soon'}]}
    eng = LegacyEngine(d.port, extra=extra)
    eng.start()
    folder, name = d.fixture('stereo_call.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='seg-good', segments=True))
    c.send(1002, transcribe_req(folder, name, sid='seg-bad', segments=True))
    answers = {b['speechID']: b for _, b in c.recv_n(2, timeout=60)}
    good, bad = answers['seg-good'], answers['seg-bad']
    assert good['result'] == '0' and bad['result'] == '0'
    assert [(s['seq'], s['channel'], s['start'], s['text'], s['lowConfidence']) for s in good['segments']] == [
        (1, 'A', 0.4, '안녕하세요', False), (2, 'B', 2.5, '네 고객님', True)]
    assert good['segments'][0]['words'] == [{'word': '안녕하세요', 'start': 0.4, 'end': 2.0, 'confidence': 0.9}]
    assert good['confidence'] == 0.9
    # Unusable segments are logged and left out; the transcript stands.
    assert bad['segments'] == [] and bad['confidence'] is None
    assert 'unusable segments for speechID=seg-bad' in d.log_text()
    recs = {r['data']['speechID']: r for r in assert_records_match(d, 2)}
    assert recs['seg-good']['segments'] == good['segments'] and 'segments' not in recs['seg-bad']
