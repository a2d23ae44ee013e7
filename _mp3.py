"""The MP3 backup encoders: LAME through lameenc (the default: about a third of the CPU,
measured by bench/speed.py) and LAME through PyAV's libmp3lame (what 2.0 used; kept for
the bench and as the fallback). Both take interleaved s16 PCM in native byte order.
"""
import sys
from fractions import Fraction

import av
import numpy as np

BIT_RATE = 64000
# LAME's quality/speed knob, 0 best .. 9 fastest. 3 gives the SNR of PyAV's default
# at 64 kbit/s on the call sets (bench/speed.py prints both).
LAME_QUALITY = 3


class Mp3Error(Exception):
    """The encoder failed (not the disk: that is an OSError)."""


# LAME's encoder delay in samples (3.100, which lameenc carries). Without a tag saying so a
# decoder plays it, and 529 samples of its own, as silence before the audio.
ENCODER_DELAY = 576
_XING_OFFSET = {(False, 2): 32, (False, 1): 17, (True, 2): 17, (True, 1): 9}   # after the header
_BIT_RATES = {False: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
              True: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}


def info_frame(header, channels, frames, audio_bytes, samples):
    """A silent first frame with the Info (CBR Xing) tag and LAME's delay and padding,
    as the lame CLI and FFmpeg write it, so decoders drop the encoder's delay and
    padding and the file plays exactly `samples` long. None when the stream's frames
    do not all have one size (its rate needs padding bits), which this does not handle."""
    b1, b2, b3 = header[1], header[2], header[3]
    lsf = (b1 >> 3) & 3 != 3                 # MPEG-2 or 2.5: half-size frames
    rate = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}[(b1 >> 3) & 3][(b2 >> 2) & 3]
    kbps = _BIT_RATES[lsf][b2 >> 4]
    size, rest = divmod((72 if lsf else 144) * kbps * 1000, rate)
    spf = 576 if lsf else 1152
    if rest or not size or audio_bytes != frames * size:
        return None
    pad = frames * spf - samples - ENCODER_DELAY
    if not 0 <= pad < 4096:
        return None
    frame = bytearray(size)
    frame[0:4] = bytes((header[0], b1 | 1, b2 & ~2 & 0xff, b3))    # no CRC, no padding bit
    at = 4 + _XING_OFFSET[(lsf, channels)]
    frame[at:at + 16] = b'Info' + (3).to_bytes(4, 'big') + frames.to_bytes(4, 'big') \
        + (audio_bytes + size).to_bytes(4, 'big')
    lame = at + 16
    frame[lame:lame + 9] = b'LAME3.100'
    frame[lame + 21:lame + 24] = ((ENCODER_DELAY << 12) | pad).to_bytes(3, 'big')
    return bytes(frame)


class LameWriter:
    """LAME through lameenc; the first frame's room is kept for the Info tag, written last."""
    name = 'lameenc'

    def __init__(self, path, channels, rate, bit_rate=BIT_RATE, quality=LAME_QUALITY):
        import lameenc      # imported here: the daemon's CLI commands do not need it
        self.encoder = lameenc.Encoder()
        try:
            self.encoder.set_bit_rate(bit_rate // 1000)
            self.encoder.set_in_sample_rate(rate)
            self.encoder.set_out_sample_rate(rate)
            self.encoder.set_channels(channels)
            self.encoder.set_quality(quality)
        except (RuntimeError, ValueError) as exc:
            raise Mp3Error(str(exc)) from exc
        self.channels, self.samples, self.bytes, self.header = channels, 0, 0, b''
        self.file = open(path, 'wb')
        self.reserved = 0

    def _put(self, data):
        if data and not self.header:
            self.header = bytes(data[:4])
            # Room for the Info frame, which has the size of the stream's frames.
            self.reserved = len(info_frame(self.header, self.channels, 0, 0, -ENCODER_DELAY) or b'')
            self.file.write(bytes(self.reserved))
        self.bytes += len(data)
        self.file.write(data)

    def write(self, pcm):
        if sys.byteorder != 'little':
            pcm = np.frombuffer(pcm, dtype='=i2').astype('<i2').tobytes()
        self.samples += len(pcm) // (2 * self.channels)
        try:
            data = self.encoder.encode(pcm)
        except (RuntimeError, ValueError) as exc:
            raise Mp3Error(str(exc)) from exc
        self._put(data)

    def close(self):
        try:
            try:
                self._put(self.encoder.flush())
            except (RuntimeError, ValueError) as exc:
                raise Mp3Error(str(exc)) from exc
            if self.reserved:
                size = self.reserved
                tag = info_frame(self.header, self.channels, self.bytes // size, self.bytes, self.samples)
                # Without a tag (frames of mixed sizes) the room is a valid silent frame still.
                self.file.seek(0)
                self.file.write(tag or bytes(self.header) + bytes(size - 4))
        finally:
            self.file.close()

    def abort(self):
        self.file.close()


class AvWriter:
    """2.0's encoder: PyAV's bundled libmp3lame behind an mp3 muxer."""
    name = 'pyav'

    def __init__(self, path, channels, rate, bit_rate=BIT_RATE):
        self.rate, self.channels, self.samples = rate, channels, 0
        self.layout = 'stereo' if channels == 2 else 'mono'
        try:
            self.out = av.open(path, 'w', format='mp3')
            self.stream = self.out.add_stream('libmp3lame', rate=rate, layout=self.layout)
            self.stream.bit_rate = bit_rate
        except (av.error.FFmpegError, ValueError) as exc:
            raise Mp3Error(str(exc)) from exc

    def _encode(self, frame):
        try:
            for packet in self.stream.encode(frame):
                self.out.mux(packet)
        except (av.error.FFmpegError, ValueError) as exc:
            raise Mp3Error(str(exc)) from exc

    def write(self, pcm):
        samples = np.frombuffer(pcm, dtype='=i2').reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format='s16', layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = self.samples
        frame.time_base = Fraction(1, self.rate)
        self.samples += frame.samples
        self._encode(frame)

    def close(self):
        self._encode(None)
        self.abort()

    def abort(self):
        try:
            self.out.close()
        except av.error.FFmpegError as exc:
            raise Mp3Error(str(exc)) from exc


ENCODERS = {'lameenc': LameWriter, 'pyav': AvWriter}


def open_writer(path, channels, rate, encoder='lameenc'):
    return ENCODERS[encoder](path, channels, rate)
