"""Speech engines behind one small interface: load once (in the master, before the
fork, so workers share the model's pages), open per worker, recognize PCM.

The embedded default is pocketsphinx with the English model its wheel carries.
"""
import logging
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


def make_engine(cfg):
    """The engine app.ini asks for (not yet loaded)."""
    kind = cfg['engine']['type']
    if kind == 'pocketsphinx':
        return PocketSphinxEngine(cfg['engine']['model'])
    if kind == 'remote':
        return RemoteEngine()
    raise EngineError('engine type %r is not available in this build' % kind)
