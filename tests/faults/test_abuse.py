"""Abuse against the real daemon: slowloris, connection limits, the allow list,
paths that try to lead out of the roots (also a symlink swapped after the check),
hostile file names, and frames from a fuzzer."""
import os
import random
import shutil
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import expected_texts, long_wav, transcribe_req, wait_for
from helpers import assert_records_match, monitor

TEXTS = expected_texts()


def test_slowloris_does_not_lock_out_a_real_client(make_daemon):
    d = make_daemon(max_connections=20, timeout=300).start()
    attackers = []
    for _ in range(40):
        s = socket.create_connection(('127.0.0.1', d.port), timeout=10)
        s.sendall(b'100')                 # a partial header, then nothing
        attackers.append(s)
    folder, name = d.fixture('en_morning.wav')
    c = d.client()
    c.send(1002, transcribe_req(folder, name, sid='real'))
    _, body = c.recv(60)
    assert body['result'] == '0' and body['transcript'] == TEXTS['en_morning.wav']
    m = monitor(d)
    assert m['counters'].get('evicted', 0) >= 20
    for s in attackers:
        s.close()


def test_max_connections_refuses_when_nobody_can_be_evicted(make_daemon):
    d = make_daemon(max_connections=3).start()
    clients = [d.client() for _ in range(3)]
    for c in clients:
        c.send(1003, {'type': 'engine'})            # whole frames: real clients, not evicted
        assert c.recv(10)[0] == 2003
    extra = d.client()
    assert extra.closed_by_peer(10)
    assert 'max_connections 3 reached' in d.log_text()
    clients[0].close()
    wait_for(lambda: 'connection from' in d.log_text(), 5, 'log')

    def fresh_ok():
        try:
            c = d.client()
            c.send(1003, {'type': 'engine'})
            return c.recv(5)[0] == 2003
        except (ConnectionError, TimeoutError, OSError):
            return False
    wait_for(fresh_ok, 10, 'a free slot again')


def test_allow_list_is_enforced(make_daemon):
    d = make_daemon()
    with open(d.ini) as f:
        text = f.read().replace('[server]\n', '[server]\nallow = 10.0.0.0/8, 192.168.0.0/16\n')
    with open(d.ini, 'w') as f:
        f.write(text)
    d.start()
    c = d.client()
    assert c.closed_by_peer(10)
    assert 'not in [server] allow' in d.log_text()
    with open(d.ini, 'w') as f:
        f.write(text.replace('allow = 10.0.0.0/8, 192.168.0.0/16', 'allow = 10.0.0.0/8, 127.0.0.0/8'))
    d.cli('reload', check=True)
    wait_for(lambda: 'reload done' in d.log_text(), 30, 'reload')
    c = d.client()
    c.send(1003, {'type': 'engine'})
    assert c.recv(10)[0] == 2003


def test_paths_leading_out_are_refused(daemon, tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'en_hello.wav'), outside / 'secret.wav')
    os.symlink(outside / 'secret.wav', os.path.join(daemon.data, 'link.wav'))
    os.symlink(outside, os.path.join(daemon.data, 'linkdir'))
    c = daemon.client()
    cases = [
        transcribe_req(daemon.data, 'link.wav', sid='p1'),
        transcribe_req(daemon.data, 'linkdir/secret.wav', sid='p2'),
        transcribe_req(os.path.join(daemon.data, 'linkdir'), 'secret.wav', sid='p3'),
        transcribe_req(daemon.data, '../../outside/secret.wav', sid='p4'),
        transcribe_req(str(outside), 'secret.wav', sid='p5'),
        transcribe_req(daemon.data, 'x.wav', sid='p6', audioPath=str(outside)),
        transcribe_req(daemon.data, 'x.wav', sid='p7', audioPath=os.path.join(daemon.data, 'linkdir')),
        transcribe_req(daemon.data, 'a\x00.wav', sid='p8'),
    ]
    for req in cases:
        c.send(1002, req)
        _, body = c.recv(10)
        assert body['result'] == '7', (req, body)
    assert os.path.exists(outside / 'secret.wav')
    assert os.listdir(outside) == ['secret.wav']


def test_symlink_swapped_after_the_check_is_caught_by_the_worker(make_daemon, tmp_path):
    d = make_daemon(workers=1, source_after='delete').start()
    outside = tmp_path / 'outside'
    outside.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'en_hello.wav'), outside / 'secret.wav')
    folder, inside = d.fixture('en_morning.wav')
    link = os.path.join(d.data, 'swap.wav')
    os.symlink(os.path.join(folder, inside), link)
    long_wav(os.path.join(d.data, 'long.wav'), 6)
    c = d.client()
    c.send(1002, transcribe_req(d.data, 'long.wav', sid='busy', keepSource=True))
    wait_for(lambda: any(w['speechID'] == 'busy' for w in monitor(d)['workers']), 30, 'the worker busy')
    c.send(1002, transcribe_req(d.data, 'swap.wav', sid='swap'))   # admitted: the link points inside
    wait_for(lambda: any(t['speechID'] == 'swap' for t in monitor(d)['task']), 10, 'swap admitted')
    os.unlink(link)
    os.symlink(outside / 'secret.wav', link)                        # ... and now it leads out
    answers = {b['speechID']: b for _, b in c.recv_n(2, timeout=60)}
    assert answers['swap']['result'] == '7' and 'outside the allowed roots' in answers['swap']['message']
    assert os.path.exists(outside / 'secret.wav')                   # neither read nor deleted
    assert os.listdir(outside) == ['secret.wav']
    assert_records_match(d, 2)


def test_hostile_file_names_are_only_names(daemon, tmp_path):
    names = ["a;touch PWNED;b.wav", "$(touch PWNED2).wav", "x' OR '1'='1.wav", 'q"; DROP TABLE t; --.wav',
             '`id`.wav', '공백 있는 파일.wav', '-rf.wav']
    c = daemon.client()
    for i, name in enumerate(names):
        daemon.fixture('en_morning.wav', dest=name)
        c.send(1002, transcribe_req(daemon.data, name, sid='h%d' % i))
    answers = [b for _, b in c.recv_n(len(names), timeout=120)]
    assert all(b['result'] == '0' and b['transcript'] == TEXTS['en_morning.wav'] for b in answers), answers
    for cwd in (daemon.base, daemon.data, os.getcwd()):
        assert not os.path.exists(os.path.join(cwd, 'PWNED')) and not os.path.exists(os.path.join(cwd, 'PWNED2'))
    recs = assert_records_match(daemon, len(names))
    assert sorted(r['request']['fileName'] for r in recs) == sorted(names)


# ------------------------------------------------------------------ fuzzing a live daemon

FRAME_TYPES = st.sampled_from([b'1001', b'1002', b'1003', b'1004', b'2002', b'3001', b'4001', b'9999', b'abcd'])


def _mutated_frames():
    body = st.one_of(
        st.binary(max_size=300),
        st.dictionaries(st.sampled_from(['speechID', 'filePath', 'fileID', 'fileName', 'audioPath', 'type', 'x']),
                        st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
                        max_size=6).map(lambda d: __import__('json').dumps(d).encode()))
    length = st.one_of(st.none(), st.binary(min_size=8, max_size=8), st.integers(0, 99999999).map(lambda n: b'%8d' % n))
    return st.tuples(FRAME_TYPES, length, body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_mutated_frames(), min_size=1, max_size=6), seed=st.integers(0, 2 ** 32))
def test_fuzzed_frames_get_protocol_answers_only(fuzz_daemon, frames, seed):
    """Random and mutated frames: the daemon answers with protocol frames or closes,
    never crashes, and still serves a well-behaved client afterwards."""
    rnd = random.Random(seed)
    data = b''
    for ptype, length, body in frames:
        data += ptype + (length if length is not None else b'%8d' % len(body)) + body
    s = socket.create_connection(('127.0.0.1', fuzz_daemon.port), timeout=10)
    try:
        i = 0
        try:
            while i < len(data):
                step = rnd.randint(1, 64)
                s.sendall(data[i:i + step])
                i += step
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass                          # the daemon closed on a framing error: allowed
        s.settimeout(5)
        got = b''
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    finally:
        s.close()
    # whatever came back parses as whole frames of response types
    from _packet import FrameDecoder
    for ptype, body in FrameDecoder(64 << 20).feed(got):
        assert 2000 <= ptype < 3000 or ptype == 3001, ptype
    assert fuzz_daemon.pid and os.path.exists('/proc/%d' % fuzz_daemon.pid)


def test_fuzz_left_the_daemon_healthy(fuzz_daemon):
    folder, name = fuzz_daemon.fixture('en_morning.wav')
    c = fuzz_daemon.client()
    c.send(1002, transcribe_req(folder, name, sid='after-fuzz'))
    assert c.recv(60)[1]['result'] == '0'
    assert 'Traceback' not in fuzz_daemon.psout()
    assert 'error handling an event' not in fuzz_daemon.log_text()
    assert len(fuzz_daemon.workers()) == 1
