"""Tests of _packet: the wire codec without sockets, then once over a socketpair."""
import datetime
import json
import socket
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _packet  # noqa: E402
from _packet import (  # noqa: E402
    DEFAULT_MAX_BODY, HEADER_LEN, SPEECH_ID_RE, FrameDecoder, ProtocolError, RequestError,
    Type, check_transcribe, decode_json, encode, error_body, login_response, new_speech_id,
)
from _states import Result, State  # noqa: E402


def decode_all(data, max_body=DEFAULT_MAX_BODY):
    dec = FrameDecoder(max_body)
    frames = dec.feed(data)
    assert not dec.pending
    return frames


# ---- constants and encode

def test_constants():
    assert HEADER_LEN == 12
    assert DEFAULT_MAX_BODY == 1048576
    assert [int(t) for t in Type] == [1001, 2001, 1002, 2002, 1003, 2003, 3001, 4001]
    assert Type.TRANSCRIBE_RESP == Type.TRANSCRIBE + 1000


@pytest.mark.parametrize('ptype,body', [
    (1002, b''), (2002, b'x'), (1001, b'sttengine'), (4001, b'{"a":1}'), (9999, b'z' * 12345),
])
def test_header_exactly_as_format(ptype, body):
    frame = encode(ptype, body)
    assert frame[:HEADER_LEN] == '{}{:8}'.format(ptype, len(body)).encode('ascii')
    assert frame[HEADER_LEN:] == body


def test_header_literal():
    assert encode(1002, b'a' * 123) == b'1002     123' + b'a' * 123
    assert encode(Type.LOGIN_RESP, '0') == b'2001       10'


def test_encode_dict_compact_json():
    assert encode(1003, {'type': 'all'}) == b'1003      14{"type":"all"}'
    assert encode(2003, [1, 2]) == b'2003       5[1,2]'


def test_korean_length_in_bytes():
    frame = encode(1002, {'a': '한국어'})
    body = json.dumps({'a': '한국어'}, ensure_ascii=False, separators=(',', ':')).encode('utf-8')
    assert int(frame[4:12]) == len(body) == len(frame) - HEADER_LEN
    assert frame[4:12] == b'%8d' % len(body)
    assert '한국어'.encode('utf-8') in frame  # not \uXXXX escapes
    assert decode_all(frame) == [(1002, body)]
    assert decode_json(1002, body) == {'a': '한국어'}


def test_encode_str_is_utf8():
    assert encode(2002, '한') == b'2002       3' + '한'.encode('utf-8')


def test_encode_lone_surrogate_falls_back_to_escapes():
    frame = encode(2002, {'speechID': '\ud800'})
    assert frame[HEADER_LEN:] == b'{"speechID":"\\ud800"}'
    assert decode_json(2002, frame[HEADER_LEN:]) == {'speechID': '\ud800'}


@pytest.mark.parametrize('ptype', [999, 10000, 0, -1002, '1002', 1002.0, True, None])
def test_encode_bad_type(ptype):
    with pytest.raises(ValueError):
        encode(ptype, b'')


def test_encode_too_long(monkeypatch):
    monkeypatch.setattr(_packet, 'MAX_LENGTH_FIELD', 10)
    encode(1002, b'x' * 10)
    with pytest.raises(ValueError):
        encode(1002, b'x' * 11)


def test_encode_bad_body_type():
    with pytest.raises(TypeError):
        encode(1002, 12)


def test_login_response():
    assert login_response('0') == b'2001       10'
    assert login_response(Result.ALREADY_CONNECTED) == b'2001       11'


# ---- FrameDecoder: good input

def test_round_trip_dict():
    req = {'speechID': 'abc', 'filePath': '/data/batch', 'n': [1, 2.5, None, True]}
    frames = decode_all(encode(1002, req))
    assert len(frames) == 1
    ptype, body = frames[0]
    assert ptype == 1002 and isinstance(ptype, int)
    assert decode_json(ptype, body) == req


@pytest.mark.parametrize('field', [b'00000123', b'     123', b'  000123', b'00000000', b'       0',
                                   b'12345678', b'0'])
def test_accepted_length_fields(field):
    field = field.rjust(8, b' ')
    n = int(field)
    assert decode_all(b'1002' + field + b'y' * n, max_body=max(n, 1)) == [(1002, b'y' * n)]


def test_empty_body_frame():
    dec = FrameDecoder()
    assert dec.feed(b'2001       0') == [(2001, b'')]
    assert not dec.pending and dec.buffered == 0
    assert dec.feed(encode(1003, b'') + encode(1003, b'')) == [(1003, b''), (1003, b'')]


def test_byte_by_byte():
    stream = encode(1002, {'a': '한국어'}) + encode(1001, 'sttengine') + encode(2001, b'')
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
    assert got == [(1002, '{"a":"한국어"}'.encode('utf-8')), (1001, b'sttengine'), (2001, b'')]
    assert not dec.pending


def test_several_frames_in_one_feed():
    frames = [(1000 + i, b'body%d' % i * i) for i in range(50)]
    stream = b''.join(encode(t, b) for t, b in frames)
    assert decode_all(stream) == frames


def test_split_at_every_boundary_of_three_frames():
    frames = [(1002, '{"x":"가나"}'.encode('utf-8')), (1003, b''), (4001, b'0123456789')]
    stream = b''.join(encode(t, b) for t, b in frames)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            dec = FrameDecoder()
            got = dec.feed(stream[:i]) + dec.feed(stream[i:j]) + dec.feed(stream[j:])
            assert got == frames, (i, j)
            assert not dec.pending


def test_pending_and_buffered():
    dec = FrameDecoder()
    assert not dec.pending and dec.buffered == 0
    frame = encode(1002, b'abcdef')
    assert dec.feed(frame[:5]) == []
    assert dec.pending and dec.buffered == 5
    assert dec.feed(frame[5:HEADER_LEN + 2]) == []
    assert dec.pending and dec.buffered == HEADER_LEN + 2
    assert dec.feed(frame[HEADER_LEN + 2:] + frame[:3]) == [(1002, b'abcdef')]
    assert dec.pending and dec.buffered == 3
    assert dec.feed(frame[3:]) == [(1002, b'abcdef')]
    assert not dec.pending and dec.buffered == 0


def test_body_exactly_max_accepted():
    dec = FrameDecoder(max_body=10)
    assert dec.feed(encode(1002, b'x' * 10)) == [(1002, b'x' * 10)]


def test_large_body_one_byte_at_a_time():
    # Speed is measured by bench/packet.py, not asserted here (STYLE 13).
    body = b'q' * 100_000
    frame = encode(1002, body)
    dec = FrameDecoder()
    got = []
    for i in range(len(frame)):
        got += dec.feed(frame[i:i + 1])
    assert got == [(1002, body)]


def test_many_frames_keep_buffer_small():
    dec = FrameDecoder()
    frame = encode(1002, b'x' * 1000)
    for _ in range(2000):
        assert dec.feed(frame + frame[:7]) != []
        dec.feed(frame[7:])
    assert dec.buffered == 0
    assert len(dec._buf) < 4 * len(frame)


# ---- FrameDecoder: bad input

BAD_LENGTHS = [
    b'12a45678',  # letter
    b'     12x',
    b'      +5',  # sign
    b'      -5',
    b'+0000005',
    b'  1 23  ',  # inner and trailing spaces
    b'   1 23 ',
    b'    1 23',
    b'123     ',  # trailing spaces
    b'      5 ',
    b'        ',  # all spaces
    b'0 000123',  # a space after a padding zero is an inner space
    b'\t    123',  # other whitespace
    b'    123\n',
    b'   1_000',  # int() would take the underscore
    '  ١٢٣'.encode('utf-8'),  # non-ASCII (Arabic-Indic) digits
    '  １２'.encode('utf-8'),  # fullwidth digits
    b'\x00\x00\x00\x00\x00\x00\x00\x05',
    b'    0x10',
    b'   1e3  ',
]


@pytest.mark.parametrize('field', BAD_LENGTHS)
def test_bad_length_field(field):
    assert len(field) == 8
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(b'1002' + field + b'x' * 200)
    assert info.value.ptype == 1002
    assert repr(field) in str(info.value)
    assert 'bad length field' in str(info.value)


def test_bad_length_message_exact():
    with pytest.raises(ProtocolError, match=r"^bad length field b'12a45678'$"):
        FrameDecoder().feed(b'100212a45678')


@pytest.mark.parametrize('field', [b'10a2', b'+100', b' 100', b'100 ', b'    ', b'\xef\xbc\x91\x30',
                                   b'-100', b'1_00', b'\x00\x00\x00\x00', b'GET '])
def test_bad_type_field(field):
    assert len(field) == 4
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(field + b'       0')
    assert info.value.ptype is None
    assert 'bad type field' in str(info.value)


def test_bad_header_split_byte_by_byte():
    dec = FrameDecoder()
    header = b'1003   1 2  '
    for b in header[:-1]:
        assert dec.feed(bytes([b])) == []
    with pytest.raises(ProtocolError) as info:
        dec.feed(header[-1:])
    assert info.value.ptype == 1003


def test_oversize_rejected_at_header_time():
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(b'1002 5000000')  # header only: no body has arrived yet
    assert str(info.value) == 'body of 5000000 bytes exceeds max_packet_bytes 1048576'
    assert info.value.ptype == 1002
    dec = FrameDecoder(max_body=10)
    with pytest.raises(ProtocolError, match='exceeds max_packet_bytes 10'):
        dec.feed(b'3001      11')


def test_unusable_after_error():
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(b'1002    x   ')
    for data in (encode(1002, b'ok'), b''):
        with pytest.raises(ProtocolError) as info:
            dec.feed(data)
        assert info.value.ptype == 1002


def test_frames_before_error_travel_with_it():
    good = encode(1002, b'{}') + encode(1003, b'{"type":"all"}')
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(good + b'1002  -1     ')
    assert info.value.frames == [(1002, b'{}'), (1003, b'{"type":"all"}')]
    assert info.value.ptype == 1002


def test_bad_max_body():
    with pytest.raises(ValueError):
        FrameDecoder(-1)


# ---- decode_json

@pytest.mark.parametrize('body,fragment', [
    (b'\xff\xfe{}', 'UTF-8'),
    ('{"a":"한'.encode('utf-8')[:-1], 'UTF-8'),
    (b'{"a":', 'JSON'),
    (b'', 'JSON'),
    (b'[1,2]', 'JSON object'),
    (b'"text"', 'JSON object'),
    (b'null', 'JSON object'),
    (b'[' * 100_000 + b']' * 100_000, 'nested'),
])
def test_decode_json_rejects(body, fragment):
    with pytest.raises(RequestError) as info:
        decode_json(1002, body)
    assert fragment in info.value.message
    assert '1002' in info.value.message


def test_decode_json_ok():
    assert decode_json(1003, b' {"type": "all"} ') == {'type': 'all'}


# ---- check_transcribe

def good_req(**kw):
    req = {'speechID': '20210125_112014_082971', 'domainName': 'SGDefault', 'domainCode': 'SG0001',
           'fileID': '20210125_112014_082971.wav', 'fileName': 'call-0001.wav',
           'filePath': '/data/batch', 'audioPath': '/data/batch/rec_mp3/20210125'}
    req.update(kw)
    return {k: v for k, v in req.items() if v is not DROP}


DROP = object()


@pytest.mark.parametrize('req', [
    good_req(),
    good_req(speechID=DROP),
    good_req(speechID='a' * 64),
    good_req(speechID='A'), good_req(speechID='a.b_c:d-e'), good_req(speechID='_x'),
    good_req(speechID='0..1'),
    good_req(fileID=DROP), good_req(fileName=DROP), good_req(fileID=''),
    good_req(audioPath=DROP, domainName=DROP, domainCode=DROP),
    good_req(domainName='한국 도메인', domainCode=''),
    good_req(fileName='sub/dir/한글 파일.wav'),
    good_req(extra={'x': 1}, seq=5),
])
def test_check_transcribe_accepts(req):
    copy = json.loads(json.dumps(req))
    assert check_transcribe(req) is req
    assert req == copy


@pytest.mark.parametrize('req,fragment', [
    (good_req(speechID='a' * 65), 'speechID'),
    (good_req(speechID=''), 'speechID'),
    (good_req(speechID='.hidden'), 'speechID'),
    (good_req(speechID='.'), 'speechID'),
    (good_req(speechID='..'), 'speechID'),
    (good_req(speechID='a/b'), 'speechID'),
    (good_req(speechID='../etc'), 'speechID'),
    (good_req(speechID='a\\b'), 'speechID'),
    (good_req(speechID='a\0b'), 'speechID'),
    (good_req(speechID='한국어'), 'speechID'),
    (good_req(speechID='é'), 'speechID'),
    (good_req(speechID='a b'), 'speechID'),
    (good_req(speechID='abc\n'), 'speechID'),
    (good_req(speechID=123), 'speechID'),
    (good_req(speechID=None), 'speechID'),
    (good_req(filePath=DROP), 'filePath'),
    (good_req(filePath=''), 'filePath'),
    (good_req(filePath=5), 'filePath'),
    (good_req(filePath=['/data']), 'filePath'),
    (good_req(filePath='/data\0/x'), 'filePath'),
    (good_req(fileID=DROP, fileName=DROP), 'fileID or fileName'),
    (good_req(fileID='', fileName=''), 'fileID or fileName'),
    (good_req(fileID=12345), 'fileID'),
    (good_req(fileID=None), 'fileID'),
    (good_req(fileName=True), 'fileName'),
    (good_req(fileID='a\0.wav'), 'fileID'),
    (good_req(fileName='a\0.wav'), 'fileName'),
    (good_req(fileName='\udc80.wav'), 'fileName'),
    (good_req(audioPath=7), 'audioPath'),
    (good_req(audioPath=''), 'audioPath'),
    (good_req(audioPath='/x\0'), 'audioPath'),
    (good_req(domainName={'a': 1}), 'domainName'),
    (good_req(domainCode=1), 'domainCode'),
    (good_req(domainCode='\0'), 'domainCode'),
    ([1, 2], 'JSON object'),
])
def test_check_transcribe_rejects(req, fragment):
    with pytest.raises(RequestError) as info:
        check_transcribe(req)
    assert fragment in info.value.message


def test_speech_id_messages():
    with pytest.raises(RequestError) as info:
        check_transcribe(good_req(speechID='.x'))
    assert info.value.message == ("speechID must be 1-64 characters of A-Z a-z 0-9 . _ : - "
                                  "not starting with '.'")
    with pytest.raises(RequestError) as info:
        check_transcribe(good_req(filePath=DROP))
    assert info.value.message == 'field filePath is required'


def test_speech_id_re_anchored():
    assert SPEECH_ID_RE.match('abc')
    assert not SPEECH_ID_RE.match('abc\n')
    assert not SPEECH_ID_RE.match('abc/')


# ---- new_speech_id and error_body

def test_new_speech_id_format():
    sid = new_speech_id()
    assert SPEECH_ID_RE.fullmatch(sid)
    datetime.datetime.strptime(sid, '%Y%m%d_%H%M%S_%f')
    assert len(sid) == 22


def test_new_speech_id_unique_and_increasing():
    ids = [new_speech_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_new_speech_id_same_microsecond(monkeypatch):
    # monkeypatch restores the real last id afterwards, so this far-future one
    # does not leak into other tests.
    monkeypatch.setattr(_packet, '_last_id_time', None)
    future = datetime.datetime(2999, 1, 2, 3, 4, 5, 999998)
    ids = [new_speech_id(future) for _ in range(3)]
    assert ids == ['29990102_030405_999998', '29990102_030405_999999', '29990102_030406_000000']
    # The clock is now "behind" the last id: ids keep increasing anyway.
    assert new_speech_id() == '29990102_030406_000001'


def test_new_speech_id_threads():
    out = []

    def run():
        out.extend(new_speech_id() for _ in range(2000))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 8000


def test_error_body():
    req = good_req()
    body = error_body(req, Result.BAD_REQUEST, State.NONE, 'field filePath is required')
    assert body == dict(req, result='7', state='NONE', message='field filePath is required')
    assert 'result' not in req
    assert type(body['result']) is str and type(body['state']) is str
    assert json.loads(encode(2002, body)[HEADER_LEN:])['result'] == '7'


def test_error_body_without_request():
    assert error_body(None, Result.UNSUPPORTED, State.NONE, 'x') == {
        'result': '2', 'state': 'NONE', 'message': 'x'}
    assert error_body([1], Result.BAD_REQUEST, State.NONE, 'y')['result'] == '7'


def test_error_body_overrides_echoed_result():
    body = error_body({'result': '0', 'a': 1}, Result.TIMEOUT, State.TIMEOUT, 'late')
    assert body == {'result': '5', 'a': 1, 'state': 'TIMEOUT', 'message': 'late'}


# ---- once over a real socket

def test_socketpair_split_sends():
    frames = [(1002, json.dumps({'speechID': 'id%d' % i, 't': '한국어' * i},
                                ensure_ascii=False).encode('utf-8')) for i in range(40)]
    frames.append((1003, b''))
    frames.append((1002, b'z' * 300_000))
    stream = b''.join(encode(t, b) for t, b in frames)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    errors = []

    def send():
        try:
            cuts = [0, 1, 5, 12, 13, 400, 401, 9000, 150_000, len(stream)]
            for lo, hi in zip(cuts, cuts[1:]):
                a.sendall(stream[lo:hi])
        except OSError as exc:
            errors.append(exc)
        finally:
            a.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        dec = FrameDecoder()
        got = []
        while True:
            chunk = b.recv(7000)
            if not chunk:
                break
            got += dec.feed(chunk)
        assert not dec.pending
        assert got == frames
    finally:
        sender.join()
        a.close()
        b.close()
    assert errors == []


# ---- properties

frame_st = st.tuples(st.integers(1000, 9999), st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(frame_st, max_size=8), data=st.data())
def test_property_any_split_gives_back_frames(frames, data):
    stream = b''.join(encode(t, b) for t, b in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec = FrameDecoder()
    got = []
    for lo, hi in zip([0] + cuts, cuts + [len(stream)]):
        got += dec.feed(stream[lo:hi])
    assert got == frames
    assert not dec.pending and dec.buffered == 0


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(st.one_of(st.binary(max_size=64),
                                 st.text('0123456789 +x', max_size=40).map(str.encode)),
                       max_size=10),
       max_body=st.sampled_from([0, 5, 100, DEFAULT_MAX_BODY]))
def test_property_random_bytes_frames_or_protocol_error(chunks, max_body):
    dec = FrameDecoder(max_body)
    total = 0
    for chunk in chunks:
        try:
            frames = dec.feed(chunk)
        except ProtocolError as exc:
            assert exc.ptype is None or 0 <= exc.ptype <= 9999
            with pytest.raises(ProtocolError):
                dec.feed(b'')
            return
        for ptype, body in frames:
            assert 0 <= ptype <= 9999 and len(body) <= max_body
            total += HEADER_LEN + len(body)
    assert total + dec.buffered == sum(map(len, chunks))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_property_speech_id_rule(text):
    ok = (1 <= len(text) <= 64 and not text.startswith('.')
          and all(c.isascii() and (c.isalnum() or c in '._:-') for c in text))
    req = good_req(speechID=text)
    if ok:
        assert check_transcribe(req) is req
    else:
        with pytest.raises(RequestError):
            check_transcribe(req)
