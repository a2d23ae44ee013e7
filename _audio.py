"""Audio preparation for a task: decodes the source once with PyAV, in-process, into
the engine's PCM (one buffer per channel) and the files of PROTOCOL.md (8 kHz WAV,
`_A`/`_B` per channel for stereo, the 64 kbit/s MP3 backup), each written atomically.
"""
import array
import errno
import operator
import os
import stat
import sys
import wave
from dataclasses import dataclass, field

import av
import av.error
import av.filter

import _mp3
from _states import Result, State

FILE_RATE = 8000            # the 1.0 engine's WAV format: 8 kHz 16-bit
MP3_ENCODER = 'lameenc'     # _mp3.py: lameenc, or 'pyav' (2.0's, about 3x the CPU)
MAX_RATE = 768000           # above any real recording; keeps absurd headers out of the resampler

# Two channels count as one signal ("dual mono") when no sample pair ever differs by
# more than 1% of full scale. Recorders that copy a mono line to both channels, even
# through a lossy codec, stay far below that; a real two-party call has one side
# silent while the other talks, so it crosses the limit within its first word, and
# the check stops there.
DUAL_MONO_MAX_DIFF = 32768 // 100

# Only demuxers that read nothing but the file itself: playlists (hls, dash),
# concat and sdp would let a crafted "audio" file make FFmpeg open other local
# files or network addresses.
SAFE_FORMATS = ('wav,w64,mp3,ogg,flac,mov,matroska,aac,amr,aiff,au,caf,asf,gsm,'
                'g722,g729,wv,voc,ape,tta,mpeg')
_OPEN_OPTIONS = {'format_whitelist': SAFE_FORMATS, 'protocol_whitelist': 'file'}

_DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError)


class AudioError(Exception):
    """The audio of a task could not be prepared; `state` and `result` go on the wire."""

    def __init__(self, state: State, result: Result, message: str):
        super().__init__(message)
        self.state = state
        self.result = result
        self.message = message

    def __reduce__(self):
        # Workers send these through multiprocessing queues; the default pickling
        # would call __init__ with the message alone.
        return type(self), (self.state, self.result, self.message)


@dataclass
class Prepared:
    duration: float             # seconds of the source audio
    source_channels: int        # 1 or 2 as decoded
    channels: int               # 1 or 2 after treating dual mono as mono
    dual_mono: bool
    engine_pcm: list[bytes]     # per channel: s16le mono PCM at engine_rate
    audio_wav: str | None       # file name in audio_path, None when no files were written
    audio_mp3: str | None
    channel_files: list[str] = field(default_factory=list)


def _reason(exc):
    """The cause of an OSError or FFmpeg error without the path it carries."""
    return getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__


def _temp_path(folder, name):
    return os.path.join(folder, '.{}.{}.tmp'.format(name, os.getpid()))


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        # Gone already, or nothing more can be done about it: its dot-name keeps
        # it out of the way and the next write of the same name replaces it.
        pass


class _WavFile:
    """One WAV under its temporary name: 8 kHz 16-bit, `channels` channels."""

    def __init__(self, folder, name, channels):
        self.name = name
        self.tmp = _temp_path(folder, name)
        self.writer = None
        # Opened here rather than by wave.open(path): a Wave_write whose own open
        # failed complains from its __del__.
        self.file = open(self.tmp, 'wb')
        self.writer = wave.open(self.file, 'wb')
        self.writer.setnchannels(channels)
        self.writer.setsampwidth(2)
        self.writer.setframerate(FILE_RATE)

    def close(self):
        """Patches the RIFF sizes and closes; a second call does nothing."""
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.writer = None
            self.file.close()


class _Outputs:
    """The files of one prepare() call, under temporary names until commit()."""

    def __init__(self, src, folder, stem, channels, mp3_backup):
        self.src = src
        self.folder = folder
        self.wav_name = stem + '.wav'
        self.channel_names = [stem + '_A.wav', stem + '_B.wav'] if channels == 2 else []
        self.mp3_name = stem + '.mp3' if mp3_backup else None
        self.wavs = []          # [_WavFile]: the source's channels, then A and B
        self.mp3 = None         # (temp path, _mp3 writer)
        name = self.wav_name
        try:
            os.makedirs(folder, exist_ok=True)
            for name, nch in [(self.wav_name, channels)] + [(n, 1) for n in self.channel_names]:
                self.wavs.append(_WavFile(folder, name, nch))
        except (OSError, ValueError) as exc:    # ValueError: a NUL in the path
            self.abort()
            raise self._wav_error(name, exc) from exc
        if self.mp3_name:
            tmp = _temp_path(folder, self.mp3_name)
            try:
                self.mp3 = (tmp, _mp3.open_writer(tmp, channels, FILE_RATE, MP3_ENCODER))
            except (_mp3.Mp3Error, OSError, ValueError) as exc:
                self.abort()
                _remove(tmp)
                raise self._mp3_error(exc) from exc

    def _error(self, state, name, exc):
        return AudioError(state, Result.ERROR,
                          'cannot write {} for {}: {}'.format(name, self.src, _reason(exc)))

    def _wav_error(self, name, exc):
        return self._error(State.NOFILE_WAV, name, exc)

    def _mp3_error(self, exc):
        return self._error(State.NOFILE_MP3, self.mp3_name, exc)

    def write(self, frame, pcm, split):
        """Appends one 8 kHz s16 frame: `pcm` its bytes, `split` its channels apart."""
        for wav, data in zip(self.wavs, [pcm, *split]):
            try:
                # Raw: writeframes() would seek back and rewrite the header every
                # call; close() patches it once.
                wav.writer.writeframesraw(data)
            except OSError as exc:
                raise self._wav_error(wav.name, exc) from exc
        if self.mp3:
            try:
                self.mp3[1].write(pcm)
            except (_mp3.Mp3Error, OSError) as exc:
                raise self._mp3_error(exc) from exc

    def commit(self):
        """Finishes every file, then gives each its final name."""
        for wav in self.wavs:
            try:
                wav.close()
            except OSError as exc:
                raise self._wav_error(wav.name, exc) from exc
        if self.mp3:
            try:
                self.mp3[1].close()
            except (_mp3.Mp3Error, OSError) as exc:
                raise self._mp3_error(exc) from exc
        # Renamed only once all are complete, so a failed MP3 publishes no WAV either.
        # No fsync: the engine reads these files at once, and after a crash the
        # task is redone from the source, so durability is not worth a disk flush.
        for wav in self.wavs:
            try:
                os.replace(wav.tmp, os.path.join(self.folder, wav.name))
            except OSError as exc:
                raise self._wav_error(wav.name, exc) from exc
        if self.mp3:
            try:
                os.replace(self.mp3[0], os.path.join(self.folder, self.mp3_name))
            except OSError as exc:
                raise self._mp3_error(exc) from exc
        self.wavs, self.mp3 = [], None

    def abort(self):
        """Closes and removes whatever temp files exist; safe to call more than once."""
        for wav in self.wavs:
            try:
                wav.close()
            except OSError:
                pass        # the file is deleted next; its header no longer matters
            _remove(wav.tmp)
        self.wavs = []
        if self.mp3:
            tmp, writer = self.mp3
            try:
                writer.abort()
            except (_mp3.Mp3Error, OSError):
                pass        # likewise
            _remove(tmp)
            self.mp3 = None


def _s16_bytes(frame):
    # A plane's buffer may be padded past the last sample.
    return bytes(frame.planes[0])[:frame.samples * frame.layout.nb_channels * 2]


def _split(pcm):
    """Left and right of interleaved stereo s16, as native-order arrays."""
    samples = array.array('h')
    samples.frombytes(pcm)
    return samples[0::2], samples[1::2]


def little_endian(buf):
    if sys.byteorder == 'little':
        return buf
    samples = array.array('h')
    samples.frombytes(buf)
    samples.byteswap()
    return samples.tobytes()


class _Converter:
    """One filter graph from one input format to s16 at each of `rates`: one push
    per source frame, frames out per rate. (Two av.AudioResampler fed the same frame
    do not work in this av build: the second rejects it with "Changing audio frame
    properties on the fly is not supported".)
    """

    def __init__(self, frame, layout, rates):
        self.graph = av.filter.Graph()
        source = self.graph.add('abuffer', sample_rate=str(frame.sample_rate),
                                sample_fmt=frame.format.name, channel_layout=frame.layout.name)
        split = source
        if len(rates) > 1:
            split = self.graph.add('asplit', outputs=str(len(rates)))
            source.link_to(split)
        self.sinks = []
        for index, rate in enumerate(rates):
            fmt = self.graph.add('aformat', sample_rates=str(rate), sample_fmts='s16',
                                 channel_layouts=layout)
            sink = self.graph.add('abuffersink')
            split.link_to(fmt, output_idx=index if len(rates) > 1 else 0)
            fmt.link_to(sink)
            self.sinks.append((rate, sink))
        self.graph.configure()
        self.ended = False

    def convert(self, frame):
        """Pushes `frame` (None: end of stream) and returns [(rate, s16 frame)]."""
        if frame is None:
            if self.ended:
                return []
            self.ended = True
        self.graph.push(frame)
        out = []
        for rate, sink in self.sinks:
            while True:
                try:
                    out.append((rate, sink.pull()))
                except EOFError:
                    break
                except av.error.FFmpegError as exc:
                    if exc.errno != errno.EAGAIN:
                        raise
                    break
        return out


class _Decode:
    """State of one streaming decode: converter, engine buffers, file outputs."""

    def __init__(self, src, engine_rate, audio_path, stem, mp3_backup, max_seconds):
        self.src = src
        self.engine_rate = engine_rate
        self.audio_path = audio_path
        self.stem = stem
        self.mp3_backup = mp3_backup
        self.max_seconds = max_seconds
        self.channels = 0           # of the first frame: the output's channel count
        self.samples = 0
        self.seconds = 0.0
        self.shape = None           # (sample format, rate, layout) the converter takes
        self.shape_samples = 0
        self.shape_start = 0.0      # seconds decoded before the current shape
        self.graph = None
        self.rates = [engine_rate]
        if audio_path is not None and engine_rate != FILE_RATE:
            self.rates.append(FILE_RATE)
        self.outputs = None
        self.chunks = ([], [])      # engine PCM per channel, joined at the end
        self.dual_mono = True

    def fail(self, reason):
        return AudioError(State.UNKNOWN_FORMAT, Result.ERROR,
                          'cannot decode {}: {}'.format(self.src, reason))

    def feed(self, frame):
        """One decoded source frame; None flushes the converter."""
        if frame is None:
            if self.graph is not None:
                self._emit(self.graph.convert(None))
            return
        rate = frame.sample_rate
        channels = frame.layout.nb_channels
        if rate <= 0 or rate > MAX_RATE:
            raise self.fail('unusable sample rate of {} Hz'.format(rate))
        if channels not in (1, 2):
            raise self.fail('{} channels, only 1 or 2 are supported'.format(channels))
        shape = (frame.format.name, rate, frame.layout.name)
        if shape != self.shape:
            # Joined recordings and damaged MP3 headers change the format midway;
            # a new converter takes it to the same output, as the ffmpeg of 1.0 did.
            if self.graph is None:
                self.channels = channels
                if self.audio_path is not None:
                    self.outputs = _Outputs(self.src, self.audio_path, self.stem, channels,
                                            self.mp3_backup)
            else:
                self._emit(self.graph.convert(None))
            self.graph = _Converter(frame, 'stereo' if self.channels == 2 else 'mono', self.rates)
            self.shape = shape
            self.shape_start = self.seconds
            self.shape_samples = 0
        self.samples += frame.samples
        self.shape_samples += frame.samples
        self.seconds = self.shape_start + self.shape_samples / rate
        if self.seconds > self.max_seconds:
            raise self.fail('longer than the limit of {:g} seconds'.format(self.max_seconds))
        # The converter runs on its own clock; source timestamps may be absent or
        # jump, and they would only confuse the filter graph.
        frame.pts = None
        self._emit(self.graph.convert(frame))

    def _emit(self, converted):
        for rate, out in converted:
            pcm = _s16_bytes(out)
            split = _split(pcm) if self.channels == 2 else ()
            if rate == FILE_RATE and self.outputs is not None:
                self.outputs.write(out, pcm, split)
            if rate == self.engine_rate:
                self._keep(pcm, split)

    def _keep(self, pcm, split):
        if self.channels == 1:
            self.chunks[0].append(pcm)
            return
        left, right = split
        if self.dual_mono and left != right:
            diff = max(map(abs, map(operator.sub, left, right)))
            self.dual_mono = diff <= DUAL_MONO_MAX_DIFF
        self.chunks[0].append(left.tobytes())
        self.chunks[1].append(right.tobytes())

    def engine_pcm(self):
        keep = 1 if self.channels == 1 or self.dual_mono else 2
        pcm = []
        for chunks in self.chunks[:keep]:
            pcm.append(little_endian(b''.join(chunks)))
            chunks.clear()      # frees them before the next channel is joined
        return pcm


def _check_source(src):
    try:
        st = os.stat(src)
    except (OSError, ValueError) as exc:    # ValueError: a NUL in the path
        raise AudioError(State.NOFILE_ID, Result.NOT_FOUND,
                         'audio file not found: {} ({})'.format(src, _reason(exc))) from exc
    # A FIFO or device would block or never end; a directory is no audio.
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(State.NOFILE_ID, Result.NOT_FOUND,
                         'audio file is not a regular file: {}'.format(src))


def prepare(src: str, engine_rate: int, audio_path: str | None = None, stem: str | None = None,
            mp3_backup: bool = False, max_seconds: float = 4 * 3600) -> Prepared:
    """Decodes `src` once into the engine's PCM at `engine_rate` and, when `audio_path`
    is given, writes `<stem>.wav`, `<stem>_A.wav`/`_B.wav` for stereo and, with
    `mp3_backup`, `<stem>.mp3` there. `stem` defaults to the source's name without
    its extension. Raises AudioError with the task's final state on any failure.
    """
    if not isinstance(engine_rate, int) or engine_rate <= 0:
        raise ValueError('engine_rate must be positive, not {!r}'.format(engine_rate))
    if audio_path is not None:
        stem = stem if stem is not None else os.path.splitext(os.path.basename(src))[0]
        if not stem or os.sep in stem or '\0' in stem or stem in ('.', '..'):
            raise ValueError('stem must be a plain file name, not {!r}'.format(stem))
    _check_source(src)
    job = _Decode(src, engine_rate, audio_path, stem, mp3_backup, max_seconds)
    try:
        try:
            container = av.open(src, metadata_errors='replace', container_options=_OPEN_OPTIONS)
        except FileNotFoundError as exc:
            # Removed between the check and the open.
            raise AudioError(State.NOFILE_ID, Result.NOT_FOUND,
                             'audio file not found: {}'.format(src)) from exc
        except _DECODE_ERRORS as exc:
            raise AudioError(State.UNKNOWN_FORMAT, Result.ERROR,
                             'cannot open {} as audio: {}'.format(src, _reason(exc))) from exc
        with container:
            if not container.streams.audio:
                raise job.fail('no audio stream')
            stream = container.streams.audio[0]
            good = bad = 0
            damage = None
            try:
                for packet in container.demux(stream):
                    # A damaged packet is skipped, as the ffmpeg command of 1.0 did:
                    # one glitch should not cost the whole recording. A file that
                    # is mostly damage fails below.
                    try:
                        frames = packet.decode()
                    except av.error.InvalidDataError as exc:
                        bad += 1
                        damage = exc
                        continue
                    good += 1
                    for frame in frames:
                        job.feed(frame)
                job.feed(None)
            except _DECODE_ERRORS as exc:
                raise job.fail(_reason(exc)) from exc
        if bad and bad >= good:
            raise job.fail('{} of {} packets are damaged ({})'.format(
                bad, bad + good, _reason(damage)))
        if not job.samples:
            raise job.fail('no audio samples')
        if job.outputs is not None:
            job.outputs.commit()
    finally:
        if job.outputs is not None:
            job.outputs.abort()
    outputs = job.outputs
    pcm = job.engine_pcm()
    return Prepared(
        duration=job.seconds,
        source_channels=job.channels,
        channels=len(pcm),
        dual_mono=job.channels == 2 and job.dual_mono,
        engine_pcm=pcm,
        audio_wav=outputs.wav_name if outputs else None,
        audio_mp3=outputs.mp3_name if outputs else None,
        channel_files=list(outputs.channel_names) if outputs else [],
    )
