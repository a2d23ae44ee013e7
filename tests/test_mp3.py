"""MP3 backup encoders (_mp3.py): lameenc's file decodes as long as the source, in step
with it (its Info tag tells the decoder LAME's delay and padding), and as close to the
source as 2.0's PyAV libmp3lame at the same bit rate."""
import os
import wave

import av
import numpy as np
import pytest

import _mp3
from conftest import FIXTURES


def read(path):
    with wave.open(path) as w:
        rate, ch = w.getframerate(), w.getnchannels()
        return rate, ch, w.readframes(w.getnframes())


def encode(name, path, pcm, ch, rate):
    writer = _mp3.open_writer(path, ch, rate, name)
    chunk = 2 * ch * 1000
    for i in range(0, len(pcm), chunk):
        writer.write(pcm[i:i + chunk])
    writer.close()


def decode(path):
    with av.open(path) as c:
        assert c.streams.audio[0].bit_rate == _mp3.BIT_RATE
        arr = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    return arr.T * 32768.0


def snr(ref, out):
    n = min(len(ref), len(out))
    err = ref[:n] - out[:n]
    return 10 * np.log10((ref[:n] ** 2).sum() / (err ** 2).sum())


@pytest.mark.parametrize('fixture', ['stereo_call.wav', 'en_internet.wav'])
def test_lameenc_matches_pyav(tmp_path, fixture):
    rate, ch, pcm = read(os.path.join(FIXTURES, fixture))
    ref = np.frombuffer(pcm, '<i2').reshape(-1, ch).astype(np.float64)
    out = {}
    for name in ('pyav', 'lameenc'):
        path = str(tmp_path / (name + '.mp3'))
        encode(name, path, pcm, ch, rate)
        out[name] = decode(path)
        # Exactly as long as the source: the encoder's delay and padding were dropped.
        assert abs(len(out[name]) - len(ref)) <= 1, name
        assert out[name].shape[1] == ch
    assert snr(ref, out['lameenc']) >= snr(ref, out['pyav']) - 0.5
    assert snr(ref, out['lameenc']) > 15


def test_info_frame_is_refused_for_mixed_frame_sizes():
    # 44.1 kHz frames alternate sizes with the padding bit; no tag is made for them.
    header = bytes((0xFF, 0xFB, 0x90, 0xC4))
    assert _mp3.info_frame(header, 2, 10, 4180, 10000) is None
    header8k = bytes((0xFF, 0xE3, 0x88, 0xC4))       # MPEG-2.5, 64 kbit/s, 8 kHz, mono
    frame = _mp3.info_frame(header8k, 1, 10, 5760, 10 * 576 - 576 - 100)
    assert len(frame) == 576 and frame[13:17] == b'Info' and b'LAME3.100' in frame
