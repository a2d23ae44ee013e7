"""Voice activity gating before the engine: finds the speech regions of each channel
(WebRTC's VAD, an energy floor, and for stereo calls the other channel's level), sends
only those regions, padded and joined, to the engine, and maps its word times back to
the source's timeline. `[engine] vad` and its thresholds in app.ini.
"""
import bisect
import logging
from dataclasses import dataclass, field

import numpy as np

from _engine import Recognition, Utterance, Word, utterances_of

log = logging.getLogger('vad')

VAD_RATES = (8000, 16000, 32000, 48000)     # what WebRTC's VAD takes


@dataclass
class VadSettings:
    enabled: bool = True
    aggressiveness: int = 3         # WebRTC VAD mode 0 (lenient) .. 3 (strict)
    frame_ms: int = 30              # 10, 20 or 30
    min_dbfs: float = -45.0         # frames quieter than this are silence, whatever the VAD says
    padding_secs: float = 0.3       # kept before each region: quiet onsets (/h/) the VAD misses
    padding_after_secs: float = 0.06    # kept after each region
    # Onset of each region after a channel's first (which nothing leads into in the engine's
    # stream): its start moves back over the frames a lenient VAD (this mode) still calls
    # voice, then by lead_secs of lead-in, padding_secs at most. -1: padding_secs always.
    onset_aggressiveness: int = 0
    lead_secs: float = 0.1
    min_speech_secs: float = 0.12   # shorter bursts (clicks) are dropped
    bridge_secs: float = 0.5        # silences shorter than this inside speech are kept as they are
    crosstalk_db: float = 15.0      # stereo: a frame this much quieter than the other channel's is echo

    @classmethod
    def from_config(cls, cfg):
        e = cfg['engine']
        return cls(enabled=bool(e['vad']), aggressiveness=int(e['vad_aggressiveness']),
                   min_dbfs=float(e['vad_min_dbfs']), padding_secs=float(e['vad_padding_secs']),
                   padding_after_secs=float(e['vad_padding_after_secs']),
                   onset_aggressiveness=int(e['vad_onset_aggressiveness']), lead_secs=float(e['vad_lead_secs']),
                   min_speech_secs=float(e['vad_min_speech_secs']), bridge_secs=float(e['vad_bridge_secs']),
                   crosstalk_db=float(e['vad_crosstalk_db']))


@dataclass
class Gated:
    """One channel after gating: the PCM the engine gets and where each piece came from."""
    pcm: bytes
    spans: list = field(default_factory=list)   # [(engine start, source start, length)] in samples
    source_samples: int = 0

    @property
    def kept_share(self):
        kept = sum(length for _, _, length in self.spans)
        return kept / self.source_samples if self.source_samples else 0.0

    def span_at(self, samples):
        """Index of the span holding a position in the engine's PCM (the spans lie end to end
        from 0 there; a position past the last is the last's)."""
        return max(0, bisect.bisect_right(self.spans, (samples, float('inf'))) - 1)

    def to_source(self, samples):
        """A position in the engine's PCM (samples) as a position in the source."""
        if not self.spans:
            return samples
        dst, src, length = self.spans[self.span_at(samples)]
        return src + min(length, max(0, samples - dst))


def _frame_levels(samples, frame):
    """Level of each whole frame in dBFS."""
    n = len(samples) // frame
    if not n:
        return np.zeros(0)
    x = samples[:n * frame].astype(np.float64).reshape(n, frame)
    rms = np.sqrt(np.mean(x * x, axis=1)) + 1e-3
    return 20 * np.log10(rms / 32768.0)


def _vad_flags(pcm, rate, settings, n, mode=None):
    import webrtcvad     # imported here: only a worker with the gate on needs it
    vad = webrtcvad.Vad(settings.aggressiveness if mode is None else mode)
    step = 2 * rate * settings.frame_ms // 1000
    return np.fromiter((vad.is_speech(pcm[i * step:(i + 1) * step], rate) for i in range(n)),
                       dtype=bool, count=n)


def _runs(flags):
    """[(first, end)] index ranges where flags are true."""
    if not len(flags):
        return []
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


def _smooth(flags, settings, bridge=True):
    """Fills short holes in speech, then drops bursts too short to be words."""
    frame_secs = settings.frame_ms / 1000
    longest = int(round(settings.bridge_secs / frame_secs)) if bridge else 0
    out = flags.copy()
    for first, end in _runs(~flags):
        if 0 < first and end < len(flags) and end - first <= longest:
            out[first:end] = True
    shortest = max(1, int(round(settings.min_speech_secs / frame_secs)))
    for first, end in _runs(out):
        if end - first < shortest:
            out[first:end] = False
    return out


def speech_flags(channels, rate, settings):
    """Per channel, one bool per frame: speech worth sending to the engine."""
    frame = rate * settings.frame_ms // 1000
    arrays = [np.frombuffer(pcm, dtype='<i2') for pcm in channels]
    n = min(len(a) for a in arrays) // frame if arrays else 0
    levels = [_frame_levels(a, frame)[:n] for a in arrays]
    # Cross-talk is judged on levels over ~0.3 s: frame by frame, the dips between the
    # speaker's words would let bits of the echo through.
    window = np.ones(max(1, 300 // settings.frame_ms))
    power = [np.convolve(10 ** (lv / 10), window, mode='same') for lv in levels]
    out = []
    for index, pcm in enumerate(channels):
        flags = _smooth(_vad_flags(pcm, rate, settings, n) & (levels[index] >= settings.min_dbfs), settings)
        if len(channels) == 2 and settings.crosstalk_db > 0:
            # The far side's voice leaking into this channel: much quieter than the other's.
            echo = power[index] < power[1 - index] * 10 ** (-settings.crosstalk_db / 10)
            flags = _smooth(flags & ~echo, settings, bridge=False)
        out.append(flags)
    return out, frame


def onset_flags(pcm, rate, settings, n):
    """The lenient VAD's frames (None with onset_aggressiveness -1): where a region's
    start may move back to."""
    if settings.onset_aggressiveness < 0:
        return None
    return _vad_flags(pcm, rate, settings, n, settings.onset_aggressiveness)


def _padding_before(first, onset, frame, rate, settings):
    """Samples kept before a region starting at frame `first`."""
    most = int(settings.padding_secs * rate)
    if onset is None:
        return most
    at = first
    lead = int(settings.lead_secs * rate)
    while at > 0 and onset[at - 1] and (first - at + 1) * frame + lead <= most:
        at -= 1
    return min(most, (first - at) * frame + lead)


def regions(flags, frame, total, rate, settings, onset=None):
    """Speech regions in source samples, padded and merged where the padding meets."""
    after = int(settings.padding_after_secs * rate)
    out = []
    for first, end in _runs(flags):
        # The engine's stream starts with the first region: nothing before it to lead in.
        before = _padding_before(first, onset if out else None, frame, rate, settings)
        start, stop = max(0, first * frame - before), min(total, end * frame + after)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def gate(channels, rate, settings):
    """Each channel's PCM (s16le mono at `rate`) cut down to its speech regions."""
    if rate not in VAD_RATES:
        raise ValueError('the VAD takes %s Hz, not %d' % (VAD_RATES, rate))
    flags, frame = speech_flags(channels, rate, settings)
    out = []
    for pcm, channel_flags in zip(channels, flags):
        total = len(pcm) // 2
        parts, spans, dst = [], [], 0
        onset = onset_flags(pcm, rate, settings, len(channel_flags))
        for start, stop in regions(channel_flags, frame, total, rate, settings, onset):
            parts.append(pcm[2 * start:2 * stop])
            spans.append((dst, start, stop - start))
            dst += stop - start
        out.append(Gated(b''.join(parts), spans, total))
    return out


def _remap(rec, gated, rate):
    """`rec` of the gated PCM put back on the source's timeline, utterance by utterance."""
    def place(w):
        a, b = int(round(w.start * rate)), int(round(w.end * rate))
        # A word the engine heard across a join (the end of one region and the start of the
        # next) lies in the one that holds most of it: on the source's timeline the pause
        # between them, which it never heard, is not part of it.
        first, last = gated.span_at(a), gated.span_at(max(a, b - 1))
        if first < last:
            _, dst, length = max((min(b, dst + length) - max(a, dst), dst, length)
                                 for dst, _, length in gated.spans[first:last + 1])
            a, b = max(a, dst), min(b, dst + length)
        start = gated.to_source(a)
        # The end is the last sample of the word, so a word ending at a join stays in its region.
        end = gated.to_source(max(0, b - 1)) + 1
        return Word(w.word, start / rate, max(start, end) / rate, w.confidence)
    utterances = []
    for u in rec.utterances:
        words = [place(w) for w in u.words]
        # The gate shortens pauses to twice the padding; cut again where the source's
        # pause is long enough to end an utterance.
        pieces = utterances_of(words)
        if len(pieces) > 1:
            utterances.extend(pieces)
            continue
        start = words[0].start if words else gated.to_source(int(round(u.start * rate))) / rate
        end = words[-1].end if words else gated.to_source(int(round(u.end * rate))) / rate
        utterances.append(Utterance(start, end, u.text, u.confidence, words))
    return Recognition(rec.text, utterances)


def recognize(engine, channels, settings, beat=None, tag=''):
    """The engine's Recognition per channel, with the gate on or off; word times are
    always on the source's timeline."""
    rate = engine.sample_rate
    if not settings.enabled or rate not in VAD_RATES:
        out = []
        for pcm in channels:
            out.append(engine.recognize(pcm))
            if beat:
                beat()
        return out
    out = []
    for pcm, gated in zip(channels, gate(channels, rate, settings)):
        log.debug('%s: vad keeps %.0f %% of %.1f s', tag, 100 * gated.kept_share, gated.source_samples / rate)
        rec = engine.recognize_kept(gated.pcm, pcm) if gated.pcm else Recognition('')
        out.append(_remap(rec, gated, rate))
        if beat:
            beat()
    return out
