"""Tests of _audio.prepare() on real speech (tests/fixtures, made by make_fixtures.py)
and on broken inputs built here; transcripts come from pocketsphinx's English model.
"""
import array
import json
import os
import pathlib
import pickle
import random
import struct
import sys
import wave

import av
import pytest

import _engine
from _audio import AudioError, DUAL_MONO_MAX_DIFF, prepare
from _states import Result, State

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
with open(os.path.join(FIXTURES, 'fixtures.json')) as _f:
    EXPECTED = json.load(_f)
MONO = sorted(name for name, text in EXPECTED.items()
              if isinstance(text, str) and name != 'dual_mono.wav')
ENGINE_RATE = 16000


@pytest.fixture(scope='module')
def engine():
    """The daemon's own pocketsphinx engine, loaded once."""
    e = _engine.PocketSphinxEngine()
    e.load()
    return e


def recognize(engine, pcm):
    return engine.recognize(pcm).text


def words_with_times(engine, pcm):
    """[(start seconds, word)], fillers and silences left out."""
    return [(w.start, w.word) for w in engine.recognize(pcm).words]


def fixture(name):
    return os.path.join(FIXTURES, name)


def decoded(path):
    """(sample rate, channels, seconds) of `path` as PyAV decodes it."""
    with av.open(path) as container:
        stream = container.streams.audio[0]
        samples = 0
        for frame in container.decode(stream):
            samples += frame.samples
            rate, channels = frame.sample_rate, frame.layout.nb_channels
    return rate, channels, samples / rate


def wav_params(path):
    with wave.open(path) as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


def wav_samples(path):
    with wave.open(path) as w:
        samples = array.array('h')
        samples.frombytes(w.readframes(w.getnframes()))
    if sys.byteorder == 'big':
        samples.byteswap()
    return samples


def pcm_samples(pcm):
    samples = array.array('h')
    samples.frombytes(pcm)
    if sys.byteorder == 'big':
        samples.byteswap()
    return samples


def wav_header(rate, channels, bits, data=b''):
    """A PCM WAV written by hand, so that it can say what the wave module refuses to."""
    align = channels * bits // 8
    fmt = struct.pack('<HHIIHH', 1, channels, rate, rate * align, align, bits)
    return (b'RIFF' + struct.pack('<I', 36 + len(data)) + b'WAVE'
            + b'fmt ' + struct.pack('<I', len(fmt)) + fmt
            + b'data' + struct.pack('<I', len(data)) + data)


def write_silence(path, seconds, channels=1, rate=8000):
    with wave.open(str(path), 'wb') as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(int(seconds * rate) * channels * 2))


# -- transcripts -------------------------------------------------------------------

@pytest.mark.parametrize('name', MONO)
def test_mono_fixture_transcribes(engine, name):
    prepared = prepare(fixture(name), ENGINE_RATE)
    assert (prepared.source_channels, prepared.channels, prepared.dual_mono) == (1, 1, False)
    assert len(prepared.engine_pcm) == 1
    assert abs(len(prepared.engine_pcm[0]) / 2 / ENGINE_RATE - prepared.duration) < 0.01
    assert recognize(engine, prepared.engine_pcm[0]) == EXPECTED[name]


def test_stereo_call_per_channel_and_in_order(engine):
    want = EXPECTED['stereo_call.wav']
    prepared = prepare(fixture('stereo_call.wav'), ENGINE_RATE)
    assert (prepared.source_channels, prepared.channels, prepared.dual_mono) == (2, 2, False)
    assert len(prepared.engine_pcm) == 2
    words = []
    for channel, pcm in zip('AB', prepared.engine_pcm):
        channel_words = words_with_times(engine, pcm)
        assert ' '.join(w for _t, w in channel_words) == want[channel]
        words += [(t, channel, w) for t, w in channel_words]
    # Merge both channels by time into turns, as the engine step will.
    turns = []
    for start, channel, word in sorted(words):
        if turns and turns[-1][0] == channel:
            turns[-1][1].append(word)
        else:
            turns.append((channel, [word], start))
    assert [(c, ' '.join(w)) for c, w, _s in turns] == [(t['channel'], t['text'])
                                                       for t in want['turns']]
    for (_c, _w, start), turn in zip(turns, want['turns']):
        assert turn['start'] <= start < turn['end']


def test_dual_mono_is_one_channel(engine, tmp_path):
    out = tmp_path / 'out'
    prepared = prepare(fixture('dual_mono.wav'), ENGINE_RATE, str(out), 'dm')
    assert (prepared.source_channels, prepared.channels, prepared.dual_mono) == (2, 1, True)
    assert len(prepared.engine_pcm) == 1
    assert recognize(engine, prepared.engine_pcm[0]) == EXPECTED['dual_mono.wav']
    # The fixture's channels are not byte-equal: the tolerance did the work.
    both = wav_samples(fixture('dual_mono.wav'))
    assert both[0::2] != both[1::2]
    # On disk the source's two channels stay, as 1.0 made them.
    assert wav_params(str(out / 'dm.wav'))[1] == 2
    assert prepared.channel_files == ['dm_A.wav', 'dm_B.wav']
    assert all((out / name).is_file() for name in prepared.channel_files)


def test_channels_apart_beyond_tolerance_are_stereo(tmp_path):
    src = tmp_path / 'apart.wav'
    left = array.array('h', [0, 1000, -1000, 0] * 2000)
    right = array.array('h', left)
    right[4001] += DUAL_MONO_MAX_DIFF + 50
    with wave.open(str(src), 'wb') as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        frames = array.array('h', [0]) * (2 * len(left))
        frames[0::2], frames[1::2] = left, right
        w.writeframes(frames.tobytes())
    prepared = prepare(str(src), 8000)
    assert (prepared.channels, prepared.dual_mono) == (2, False)


def test_silent_stereo_is_dual_mono(tmp_path):
    src = tmp_path / 'silent.wav'
    write_silence(src, 1, channels=2)
    prepared = prepare(str(src), ENGINE_RATE)
    assert (prepared.channels, prepared.dual_mono, len(prepared.engine_pcm)) == (1, True, 1)


# -- written files -----------------------------------------------------------------

@pytest.mark.parametrize('name', ['en_hello.wav', 'fmt_44k.wav', 'fmt_8bit.wav', 'fmt_24bit.wav',
                                  'fmt_mp3.mp3', 'stereo_call.wav', 'dual_mono.wav'])
def test_written_files(tmp_path, name):
    out = tmp_path / 'made' / 'here'    # missing folders are created
    prepared = prepare(fixture(name), ENGINE_RATE, str(out), 'call1', mp3_backup=True)
    _rate, source_channels, source_seconds = decoded(fixture(name))
    assert prepared.source_channels == source_channels
    assert abs(prepared.duration - source_seconds) < 0.001
    assert (prepared.audio_wav, prepared.audio_mp3) == ('call1.wav', 'call1.mp3')
    stereo = source_channels == 2
    assert prepared.channel_files == (['call1_A.wav', 'call1_B.wav'] if stereo else [])
    # Every file has its final name and no temporary one is left behind.
    assert sorted(os.listdir(out)) == sorted(['call1.wav', 'call1.mp3'] + prepared.channel_files)

    rate, channels, width, frames = wav_params(str(out / 'call1.wav'))
    assert (rate, channels, width) == (8000, source_channels, 2)
    assert abs(frames / rate - source_seconds) <= 0.05
    assert decoded(str(out / 'call1.wav'))[:2] == (8000, source_channels)

    if stereo:
        both = wav_samples(str(out / 'call1.wav'))
        for index, part in enumerate(prepared.channel_files):
            assert wav_params(str(out / part)) == (8000, 1, 2, frames)
            assert wav_samples(str(out / part)) == both[index::2]

    with av.open(str(out / 'call1.mp3')) as container:
        assert container.format.name == 'mp3'
        assert container.streams.audio[0].bit_rate == 64000
    mp3_rate, mp3_channels, mp3_seconds = decoded(str(out / 'call1.mp3'))
    assert (mp3_rate, mp3_channels) == (8000, source_channels)
    assert abs(mp3_seconds - source_seconds) <= 0.05


def test_written_wav_is_the_engine_pcm_at_8k(tmp_path):
    prepared = prepare(fixture('stereo_call.wav'), 8000, str(tmp_path), 'x')
    for pcm, name in zip(prepared.engine_pcm, prepared.channel_files):
        assert pcm_samples(pcm) == wav_samples(str(tmp_path / name))


def test_written_wav_transcribes(engine, tmp_path):
    prepare(fixture('en_hello.wav'), ENGINE_RATE, str(tmp_path), 'again')
    prepared = prepare(str(tmp_path / 'again.wav'), ENGINE_RATE)
    assert recognize(engine, prepared.engine_pcm[0]) == EXPECTED['en_hello.wav']


def test_default_stem_and_no_mp3(tmp_path):
    prepared = prepare(fixture('en_morning.wav'), ENGINE_RATE, str(tmp_path))
    assert (prepared.audio_wav, prepared.audio_mp3) == ('en_morning.wav', None)
    assert os.listdir(tmp_path) == ['en_morning.wav']


def test_no_files_without_audio_path():
    prepared = prepare(fixture('en_morning.wav'), ENGINE_RATE, mp3_backup=True)
    assert (prepared.audio_wav, prepared.audio_mp3, prepared.channel_files) == (None, None, [])


def test_the_mp3_alone_when_no_wav_is_wanted(tmp_path):
    # keep_wav = false with an embedded engine: the MP3 backup is written, no WAV at all.
    plain = prepare(fixture('stereo_call.wav'), ENGINE_RATE)
    prepared = prepare(fixture('stereo_call.wav'), ENGINE_RATE, str(tmp_path), 'call', mp3_backup=True,
                       write_wav=False)
    assert (prepared.audio_wav, prepared.audio_mp3, prepared.channel_files) == (None, 'call.mp3', [])
    assert os.listdir(tmp_path) == ['call.mp3'] and os.path.getsize(tmp_path / 'call.mp3') > 0
    assert prepared.engine_pcm == plain.engine_pcm


def test_rewrite_replaces_earlier_files(tmp_path):
    prepare(fixture('en_morning.wav'), ENGINE_RATE, str(tmp_path), 'same')
    prepare(fixture('en_hello.wav'), ENGINE_RATE, str(tmp_path), 'same')
    assert abs(wav_params(str(tmp_path / 'same.wav'))[3] / 8000
               - decoded(fixture('en_hello.wav'))[2]) <= 0.05
    assert os.listdir(tmp_path) == ['same.wav']


# -- broken inputs -----------------------------------------------------------------

def _missing(tmp_path):
    return tmp_path / 'nope.wav'


def _directory(tmp_path):
    path = tmp_path / 'dir.wav'
    path.mkdir()
    return path


def _fifo(tmp_path):
    # Opening a FIFO for reading would block until a writer comes.
    path = tmp_path / 'fifo.wav'
    os.mkfifo(path)
    return path


def _content(data):
    def build(tmp_path):
        path = tmp_path / 'bad.wav'
        path.write_bytes(data)
        return path
    return build


def _three_channels(tmp_path):
    path = tmp_path / 'three.wav'
    with wave.open(str(path), 'wb') as w:
        w.setnchannels(3)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(8000 * 3 * 2))
    return path


def _playlist(tmp_path):
    # A concat playlist would make FFmpeg read another file than the one named.
    path = tmp_path / 'list.wav'
    path.write_text('ffconcat version 1.0\nfile {}\n'.format(fixture('en_hello.wav')))
    return path


def _nul(tmp_path):
    return tmp_path / 'a\0b.wav'


NOFILE = (State.NOFILE_ID, Result.NOT_FOUND)
UNKNOWN = (State.UNKNOWN_FORMAT, Result.ERROR)
BROKEN = {
    'missing': (_missing, NOFILE),
    'directory': (_directory, NOFILE),
    'fifo': (_fifo, NOFILE),
    'nul in name': (_nul, NOFILE),
    'empty': (_content(b''), UNKNOWN),
    'random bytes': (_content(random.Random(7).randbytes(50000)), UNKNOWN),
    'text': (_content(b'speechID,fileID\n1,a.wav\n' * 50), UNKNOWN),
    'truncated header': (_content(wav_header(8000, 1, 16)[:30]), UNKNOWN),
    'header only': (_content(wav_header(8000, 1, 16)), UNKNOWN),
    'zero hz': (_content(wav_header(0, 1, 16, bytes(16000))), UNKNOWN),
    'three channels': (_three_channels, UNKNOWN),
    'playlist': (_playlist, UNKNOWN),
}


@pytest.mark.parametrize('case', list(BROKEN))
def test_broken_input(tmp_path, case):
    build, (state, result) = BROKEN[case]
    src = build(tmp_path)
    out = tmp_path / 'out'
    with pytest.raises(AudioError) as info:
        prepare(str(src), ENGINE_RATE, str(out), 'x', mp3_backup=True)
    assert (info.value.state, info.value.result) == (state, result)
    assert str(src) in info.value.message and info.value.message == str(info.value)
    assert not out.exists() or os.listdir(out) == []


def test_unwritable_audio_path(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with pytest.raises(AudioError) as info:
        prepare(fixture('en_morning.wav'), ENGINE_RATE, str(blocker / 'sub'), 'x')
    assert (info.value.state, info.value.result) == (State.NOFILE_WAV, Result.ERROR)
    with pytest.raises(AudioError) as info:
        prepare(fixture('en_morning.wav'), ENGINE_RATE, str(blocker), 'x')
    assert (info.value.state, info.value.result) == (State.NOFILE_WAV, Result.ERROR)
    assert 'x.wav' in info.value.message


def test_wav_failure_leaves_nothing(tmp_path):
    # A directory squatting on the temp name makes the WAV unwritable.
    (tmp_path / '.x_B.wav.{}.tmp'.format(os.getpid())).mkdir()
    with pytest.raises(AudioError) as info:
        prepare(fixture('stereo_call.wav'), ENGINE_RATE, str(tmp_path), 'x', mp3_backup=True)
    assert (info.value.state, info.value.result) == (State.NOFILE_WAV, Result.ERROR)
    assert os.listdir(tmp_path) == ['.x_B.wav.{}.tmp'.format(os.getpid())]


def test_mp3_failure_leaves_nothing(tmp_path):
    (tmp_path / '.x.mp3.{}.tmp'.format(os.getpid())).mkdir()
    with pytest.raises(AudioError) as info:
        prepare(fixture('en_morning.wav'), ENGINE_RATE, str(tmp_path), 'x', mp3_backup=True)
    assert (info.value.state, info.value.result) == (State.NOFILE_MP3, Result.ERROR)
    assert 'x.mp3' in info.value.message
    # All or nothing: the WAV that was fine is not published without its MP3.
    assert os.listdir(tmp_path) == ['.x.mp3.{}.tmp'.format(os.getpid())]


def test_too_long_fails_early_and_cleanly(tmp_path):
    src = tmp_path / 'long.wav'
    write_silence(src, 10)
    out = tmp_path / 'out'
    with pytest.raises(AudioError) as info:
        prepare(str(src), ENGINE_RATE, str(out), 'x', mp3_backup=True, max_seconds=5)
    assert (info.value.state, info.value.result) == (State.UNKNOWN_FORMAT, Result.ERROR)
    assert 'long.wav' in info.value.message
    assert os.listdir(out) == []
    assert prepare(str(src), ENGINE_RATE, max_seconds=10).duration == pytest.approx(10)


def test_corrupted_files_raise_only_audio_error(tmp_path):
    rng = random.Random(11)
    sources = [fixture('fmt_mp3.mp3'), fixture('en_morning.wav'), fixture('fmt_24bit.wav')]
    for index in range(60):
        data = bytearray(pathlib.Path(sources[index % len(sources)]).read_bytes())
        if index % 2:
            del data[rng.randrange(1, len(data)):]
        for _ in range(rng.randrange(1, 40)):
            data[rng.randrange(len(data) if index % 3 else 64)] = rng.randrange(256)
        src = tmp_path / 'c{}{}'.format(index, os.path.splitext(sources[index % len(sources)])[1])
        src.write_bytes(bytes(data))
        try:
            prepared = prepare(str(src), ENGINE_RATE, str(tmp_path / 'out'), 'c', mp3_backup=True)
        except AudioError as exc:
            assert exc.state in (State.UNKNOWN_FORMAT, State.NOFILE_WAV, State.NOFILE_MP3)
        else:
            assert prepared.duration > 0 and prepared.engine_pcm[0]
    leftovers = [n for n in os.listdir(tmp_path / 'out') if n.endswith('.tmp')]
    assert leftovers == []


def test_format_change_midway(tmp_path):
    # Two MP3s joined (16 kHz then 8 kHz), as recorders that append do.
    prepare(fixture('en_morning.wav'), ENGINE_RATE, str(tmp_path), 'm', mp3_backup=True)
    joined = tmp_path / 'joined.mp3'
    first = pathlib.Path(fixture('fmt_mp3.mp3')).read_bytes()
    joined.write_bytes(first + (tmp_path / 'm.mp3').read_bytes())
    prepared = prepare(str(joined), ENGINE_RATE, str(tmp_path / 'out'), 'j', mp3_backup=True)
    parts = decoded(fixture('fmt_mp3.mp3'))[2] + decoded(str(tmp_path / 'm.mp3'))[2]
    # Inside a joined file nothing tells the decoder to drop the second file's header frame,
    # encoder delay and end padding: they decode as silence, at most 576 + 1105 + 575 samples.
    assert parts <= prepared.duration <= parts + (576 + 1105 + 575) / 8000
    assert abs(len(prepared.engine_pcm[0]) / 2 / ENGINE_RATE - prepared.duration) < 0.01
    assert abs(decoded(str(tmp_path / 'out' / 'j.wav'))[2] - prepared.duration) <= 0.05


def test_audio_error_survives_pickling():
    error = pickle.loads(pickle.dumps(AudioError(State.NOFILE_ID, Result.NOT_FOUND, 'gone: a.wav')))
    assert (error.state, error.result, error.message) == (State.NOFILE_ID, Result.NOT_FOUND,
                                                         'gone: a.wav')


def test_8k_source_reaches_the_engine_unchanged():
    prepared = prepare(fixture('en_morning.wav'), 8000)
    assert pcm_samples(prepared.engine_pcm[0]) == wav_samples(fixture('en_morning.wav'))
