"""The audio pipeline through the real daemon: the files a task leaves behind, what
becomes of the source, stereo merged by time, dual mono as one speaker."""
import os
import wave

import av

from conftest import expected_texts, transcribe_req
from helpers import assert_records_match

TEXTS = expected_texts()


def duration_of(path):
    with av.open(path) as c:
        stream = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(stream))
        return samples / stream.rate, stream.rate, stream.channels


def test_stereo_call_files_and_merged_transcript(make_daemon):
    d = make_daemon(mp3='true', source_after='delete').start()
    folder, name = d.fixture('stereo_call.wav')
    target = os.path.join(d.base, 'batch', 'rec_mp3', 'call')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='st1', audioPath=target))
    _, body = c.recv(120)
    expect = TEXTS['stereo_call.wav']
    assert body['result'] == '0'
    assert body['transcript'] == expect['transcript']
    assert body['channels'] == [{'channel': 'A', 'transcript': expect['A']},
                                {'channel': 'B', 'transcript': expect['B']}]
    assert (body['audioWAV'], body['audioMP3']) == ('st1.wav', 'st1.mp3')
    src_secs = 7.582
    with wave.open(os.path.join(target, 'st1.wav')) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 2, 2)
        assert abs(w.getnframes() / 8000 - src_secs) < 0.05
    for side in ('A', 'B'):
        with wave.open(os.path.join(target, 'st1_%s.wav' % side)) as w:
            assert (w.getframerate(), w.getnchannels()) == (8000, 1)
    secs, rate, channels = duration_of(os.path.join(target, 'st1.mp3'))
    assert rate == 8000 and abs(secs - src_secs) < 0.05 + 0.072     # an MP3 frame of padding at most
    # 1.0 default: the source is removed once the WAV exists
    assert not os.path.exists(os.path.join(folder, name))
    assert not [f for f in os.listdir(target) if f.endswith('.tmp')]


def test_dual_mono_is_one_speaker(daemon):
    folder, name = daemon.fixture('dual_mono.wav')
    c = daemon.client()
    c.send(1002, transcribe_req(folder, name, sid='dm'))
    _, body = c.recv(60)
    assert body['result'] == '0'
    assert body['transcript'] == TEXTS['dual_mono.wav']
    assert len(body['channels']) == 1 and 'A:' not in body['transcript']


def test_failed_source_moves_to_error_backup_with_reason(make_daemon):
    d = make_daemon(source_after='delete').start()
    path = os.path.join(d.data, 'broken.wav')
    with open(path, 'wb') as f:
        f.write(b'RIFF\x24\x00\x00\x00WAVEfmt ' + os.urandom(200))
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'broken.wav', sid='br'))
    _, body = c.recv(60)
    assert (body['result'], body['state']) == ('9', 'UNKNOWN_FORMAT')
    assert 'broken.wav' in body['message'] and '/proc/self' not in body['message']
    assert not os.path.exists(path)
    moved = os.path.join(d.base, 'error', 'broken.wav')
    assert os.path.exists(moved)
    with open(moved + '.reason', encoding='utf-8') as f:
        assert 'broken.wav' in f.read()
    assert_records_match(d, 1)


def test_keep_source_and_keep_wav_off(make_daemon):
    d = make_daemon(source_after='delete').start()
    with open(d.ini) as f:
        text = f.read().replace('keep_wav = true', 'keep_wav = false')
    with open(d.ini, 'w') as f:
        f.write(text)
    d.cli('reload', check=True)
    from conftest import wait_for
    wait_for(lambda: 'reload done' in d.log_text(), 30, 'reload')
    folder, name = d.fixture('en_morning.wav')
    target = os.path.join(d.base, 'batch', 'rec_mp3', 'kw')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='kw', audioPath=target, keepSource=True))
    _, body = c.recv(60)
    assert body['result'] == '0' and body['transcript'] == TEXTS['en_morning.wav']
    assert os.path.exists(os.path.join(folder, name))              # asked to keep it
    assert not os.path.exists(os.path.join(target, 'kw.wav'))      # keep_wav = false
