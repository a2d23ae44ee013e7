"""Call-like test audio that the tests and bench/speed.py make themselves: stereo calls
(agent on A, customer on B) of alternating turns spoken by flite voices (espeak-ng's
Korean voice for Vosk), 0.3 to 3 s gaps, hold silence, low-level noise and a little
cross-talk of the speaker on the silent channel; mono calls with 20 to 40 % silence.

Every call comes with what was said per channel and where (source timeline), so word
error rates and segment times can be checked. Generation is deterministic for a seed
and cached under the folder given (flite and espeak-ng are deterministic too).
It needs /usr/bin/flite and /usr/bin/espeak-ng (Debian's flite and espeak-ng; test.sh
installs them).
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import _audio  # noqa: E402  (needs ROOT on the path first)

TOOLS = {'flite': '/usr/bin/flite', 'espeak-ng': '/usr/bin/espeak-ng'}

# Call-centre lines: said by the agent (A) or the customer (B).
EN_AGENT = [
    'hello customer how can i help you', 'good morning', 'we will send you an email',
    'is there anything else i can help you with', 'your payment has been received',
    'what is your phone number', 'let me check your account', 'one moment please',
    'your order will arrive on monday', 'i can transfer you to billing',
    'thank you for calling', 'can you spell your last name',
]
EN_CUSTOMER = [
    'my account number is one two three four', 'i want to cancel my order',
    'i need help with my internet connection', 'please call me back tomorrow',
    'my phone number is five five five', 'the bill is too high this month',
    'i did not receive the package', 'yes that is right', 'no thank you',
    'can you change my address', 'the service stopped working yesterday',
]
KO_AGENT = ['네 여보세요', '잠시만 기다려 주세요', '무엇을 도와 드릴까요', '감사합니다',
            '확인해 드리겠습니다', '주소를 말씀해 주세요']
KO_CUSTOMER = ['인터넷이 안 돼요', '요금이 너무 많이 나왔어요', '주문을 취소하고 싶어요',
               '네 맞아요', '내일 다시 전화 주세요', '전화번호를 바꾸고 싶어요']

NOISE_RMS = 60          # about -55 dBFS of background hiss on every channel
CROSSTALK = 0.04        # the speaker's level on the other channel (-28 dB), 20 ms late
CROSSTALK_DELAY = 0.02


@dataclass
class Call:
    path: str
    channels: int
    seconds: float
    rate: int
    said: dict          # channel label -> reference text, turns in time order
    turns: list         # [{'channel', 'text', 'start', 'end'}] on the source timeline


def _speak(lang, voice, text, rate, tmp):
    wav = os.path.join(tmp, 'tts.wav')
    if lang == 'ko':
        cmd = [TOOLS['espeak-ng'], '-v', 'ko', '-s', '150', '-w', wav, text]
    else:
        cmd = [TOOLS['flite'], '-voice', voice, '-t', text, '-o', wav]
    subprocess.run(cmd, check=True, capture_output=True)
    pcm = _audio.prepare(wav, rate).engine_pcm[0]
    speech = np.frombuffer(pcm, dtype='<i2').astype(np.float32)
    # Trim the synthesizer's own leading/trailing silence so turn times are the speech.
    loud = np.nonzero(np.abs(speech) > 300)[0]
    return speech[loud[0]:loud[-1] + 1] if len(loud) else speech


class _Builder:
    """Lays turns on one or two channels with gaps, hold silence, noise, cross-talk."""

    def __init__(self, lang, rate, seed, tmp):
        self.lang, self.rate, self.tmp = lang, rate, tmp
        self.rng = random.Random(seed)

    def lines(self, channel):
        if self.lang == 'ko':
            return KO_AGENT if channel == 'A' else KO_CUSTOMER
        return EN_AGENT if channel == 'A' else EN_CUSTOMER

    def voice(self, channel, voices):
        return voices[0] if channel == 'A' else voices[1]

    def script(self, seconds, gap_range, hold_every, voices, stereo):
        """[(channel, speech samples, start)] filling `seconds` with turns and gaps, and turns."""
        pieces, turns, pos, channel = [], [], 0, 'A'
        while pos < seconds * self.rate:
            gap = self.rng.uniform(*gap_range) if pieces else self.rng.uniform(2.0, 6.0)   # ring time
            if hold_every and pieces and self.rng.random() < 1.0 / hold_every:
                gap = self.rng.uniform(6.0, 12.0)   # "please hold": both sides silent
            pos += int(gap * self.rate)
            text = self.rng.choice(self.lines(channel))
            speech = _speak(self.lang, self.voice(channel, voices), text, self.rate, self.tmp)
            pieces.append((channel, pos, speech))
            turns.append({'channel': channel if stereo else 'A', 'text': text,
                          'start': round(pos / self.rate, 3), 'end': round((pos + len(speech)) / self.rate, 3)})
            pos += len(speech)
            channel = 'B' if channel == 'A' else 'A'
        return pieces, turns, pos

    def render(self, seconds, gap_range, hold_every, voices, stereo):
        pieces, turns, pos = self.script(seconds, gap_range, hold_every, voices, stereo)
        total = pos + int(self.rng.uniform(0.5, 1.5) * self.rate)
        nch = 2 if stereo else 1
        mix = np.zeros((nch, total), dtype=np.float32)
        delay = int(CROSSTALK_DELAY * self.rate)
        for channel, start, speech in pieces:
            own = 0 if (channel == 'A' or not stereo) else 1
            mix[own, start:start + len(speech)] += speech
            if stereo:
                mix[1 - own, start + delay:start + delay + len(speech)] += CROSSTALK * speech[:total - start - delay]
        noise = np.random.default_rng(self.rng.randrange(1 << 30)).normal(0, NOISE_RMS, mix.shape)
        mix += noise.astype(np.float32)
        return np.clip(mix, -32768, 32767).astype('<i2'), turns


def _write(path, samples, rate):
    with wave.open(path, 'wb') as w:
        w.setnchannels(samples.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.T.copy().tobytes())


def _said(turns):
    said = {}
    for t in turns:
        said.setdefault(t['channel'], []).append(t['text'])
    return {ch: ' '.join(texts) for ch, texts in said.items()}


# name -> (language, stereo, rate, call lengths in seconds, gaps, hold every n turns, voices)
SETS = {
    'stereo': ('en', True, 8000, (60, 95, 130, 170, 300), (0.3, 3.0), 12, ('kal', 'slt')),
    # Ring time and pauses: 20 to 40 % of a mono call is silence.
    'mono': ('en', False, 8000, (60, 80, 110), (0.3, 1.2), 0, ('kal', 'slt')),
    'ko_stereo': ('ko', True, 16000, (60, 75, 90), (0.3, 3.0), 12, (None, None)),
    'ko_short': ('ko', True, 16000, (10,) * 6, (0.3, 1.5), 0, (None, None)),
}


def _make_one(folder, name, index, spec, seed):
    lang, stereo, rate, lengths, gaps, hold, voices = spec
    seconds = lengths[index]
    path = os.path.join(folder, '%s_%02d.wav' % (name, index))
    meta = path + '.json'
    if os.path.exists(meta) and os.path.exists(path):
        with open(meta, encoding='utf-8') as f:
            return Call(**json.load(f))
    with tempfile.TemporaryDirectory() as tmp:
        builder = _Builder(lang, rate, '%s-%d-%d' % (name, index, seed), tmp)
        samples, turns = builder.render(seconds, gaps, hold, voices, stereo)
    _write(path + '.tmp', samples, rate)
    os.replace(path + '.tmp', path)
    call = Call(path, samples.shape[0], round(samples.shape[1] / rate, 3), rate, _said(turns), turns)
    with open(meta, 'w', encoding='utf-8') as f:
        json.dump(call.__dict__, f, ensure_ascii=False)
    return call


def make(folder, name, count=None, seed=1):
    """The calls of set `name` (see SETS), made in `folder` unless already there."""
    missing = [tool for tool in TOOLS.values() if not os.path.exists(tool)]
    if missing:
        raise RuntimeError('callsets needs %s (apt-get install flite espeak-ng; test.sh does)'
                           % ', '.join(missing))
    spec = SETS[name]
    os.makedirs(folder, exist_ok=True)
    n = len(spec[3]) if count is None else min(count, len(spec[3]))
    return [_make_one(folder, name, i, spec, seed) for i in range(n)]


def silence_share(call):
    """Share of the call in which nobody speaks (gaps and holds), from the turn times."""
    spoken = np.zeros(int(call.seconds * 100) + 1, dtype=bool)
    for t in call.turns:
        spoken[int(t['start'] * 100):int(t['end'] * 100)] = True
    return 1.0 - spoken.mean()


if __name__ == '__main__':
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), 'svcmgr-callsets')
    for set_name in sys.argv[2:] or SETS:
        for c in make(out, set_name):
            print('%s %d ch %.1f s silence %.0f %%' % (c.path, c.channels, c.seconds, 100 * silence_share(c)))


def words_off_speech(call, recs):
    """Words lying more than 0.15 s outside every turn of their channel, and all words."""
    off, total = 0, 0
    for label, rec in zip('AB', recs):
        turns = [t for t in call.turns if t['channel'] == label]
        for w in rec.words:
            total += 1
            if min(max(t['start'] - w.start, w.end - t['end'], 0) for t in turns) > 0.15:
                off += 1
    return off, total
