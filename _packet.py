"""The svcmgr wire codec: 12-byte headers, incremental frame decoding and request checks.

Pure functions and classes only (no sockets, no logging), so every byte rule of
PROTOCOL.md can be tested without a network; see tests/test_packet.py.
"""
import datetime
import json
import os
import re
import threading
from enum import IntEnum

import _jsonstrict
from _states import Result, State

HEADER_LEN = 12
TYPE_LEN = 4
DEFAULT_MAX_BODY = 1 << 20
MAX_LENGTH_FIELD = 99_999_999


class Type(IntEnum):
    """Packet types; a response is its request type + 1000."""
    LOGIN = 1001
    LOGIN_RESP = 2001
    TRANSCRIBE = 1002
    TRANSCRIBE_RESP = 2002
    MONITOR = 1003
    MONITOR_RESP = 2003
    RECOGNIZE = 3001
    RECOGNIZE_RESP = 4001


class ProtocolError(Exception):
    """A framing error: the stream cannot be resynchronised and must be closed.

    `ptype` is the request type when the 4-digit type field was readable, so the
    server can answer once with ptype + 1000 before closing; otherwise None.
    `frames` holds the whole frames decoded by the same feed() call before the
    bad header, so the caller can still answer them.
    """

    def __init__(self, message, ptype=None, frames=()):
        super().__init__(message)
        self.message = message
        self.ptype = ptype
        self.frames = list(frames)


class RequestError(Exception):
    """A bad request inside a good frame: answered with result 7, the connection stays open."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


def _body_bytes(body):
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode('utf-8')
    if isinstance(body, (dict, list)):
        # Strict JSON only: a 1.0 client's parser (or a webhook receiver) refuses NaN.
        text = _jsonstrict.dumps(body, ensure_ascii=False, separators=(',', ':'))
        try:
            return text.encode('utf-8')
        except UnicodeEncodeError:
            # A lone surrogate (legal as a \ud800 escape in a request we echo)
            # has no UTF-8 form; escaped ASCII JSON still carries it faithfully.
            return _jsonstrict.dumps(body, ensure_ascii=True, separators=(',', ':')).encode('ascii')
    raise TypeError('packet body must be bytes, str, dict or list, not %s' % type(body).__name__)


def encode(ptype, body):
    """One frame: the header exactly as 1.0 writes it, then the body as UTF-8 bytes."""
    if isinstance(ptype, bool) or not isinstance(ptype, int) or not 1000 <= ptype <= 9999:
        raise ValueError('packet type must be a 4-digit number 1000..9999, not %r' % (ptype,))
    data = _body_bytes(body)
    if len(data) > MAX_LENGTH_FIELD:
        raise ValueError('body of %d bytes does not fit the 8-digit length field' % len(data))
    header = '{}{:8}'.format(int(ptype), len(data)).encode('ascii')
    return header + data


def login_response(code):
    """The 2001 answer: one plain-text digit ("0", "1" or "2")."""
    return encode(Type.LOGIN_RESP, str(code))


# Byte patterns rather than int(): int() would also take signs, underscores,
# surrounding whitespace and non-ASCII digits, which 1.0 peers never send.
_TYPE_FIELD_RE = re.compile(rb'[0-9]{4}')
_LENGTH_FIELD_RE = re.compile(rb' *[0-9]+')


def _parse_header(header, max_body):
    type_field = header[:TYPE_LEN]
    if not _TYPE_FIELD_RE.fullmatch(type_field):
        raise ProtocolError('bad type field %r' % bytes(type_field))
    ptype = int(type_field)
    length_field = header[TYPE_LEN:HEADER_LEN]
    if not _LENGTH_FIELD_RE.fullmatch(length_field):
        raise ProtocolError('bad length field %r' % bytes(length_field), ptype)
    length = int(length_field)
    if length > max_body:
        raise ProtocolError('body of %d bytes exceeds max_packet_bytes %d' % (length, max_body), ptype)
    return ptype, length


class FrameDecoder:
    """Reassembles frames from bytes split or merged in any way.

    Bytes live in one bytearray with a read offset; the consumed prefix is cut
    only when it is at least half the buffer, so feeding a large body one byte at
    a time stays linear.
    """

    _COMPACT_MIN = 64 * 1024

    def __init__(self, max_body=DEFAULT_MAX_BODY):
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ValueError('max_body must be a non-negative int, not %r' % (max_body,))
        self.max_body = max_body
        self._buf = bytearray()
        self._pos = 0
        # The header of the frame at _pos once parsed, so a body arriving byte by
        # byte does not re-parse it on every feed.
        self._header = None
        self._error = None

    @property
    def buffered(self):
        """Bytes held that belong to frames not yet returned (headers included)."""
        return len(self._buf) - self._pos

    @property
    def pending(self):
        """True inside a frame; a clean close is only possible when this is False."""
        return self.buffered > 0

    def feed(self, data):
        """Add received bytes; return every frame completed so far as (type, body)."""
        if self._error is not None:
            raise ProtocolError('decoder already failed: %s' % self._error.message, self._error.ptype)
        self._buf += data
        frames = []
        buf = self._buf
        while True:
            avail = len(buf) - self._pos
            if self._header is None:
                if avail < HEADER_LEN:
                    break
                try:
                    self._header = _parse_header(buf[self._pos:self._pos + HEADER_LEN], self.max_body)
                except ProtocolError as exc:
                    exc.frames = frames
                    self._error = exc
                    raise
            ptype, length = self._header
            if avail < HEADER_LEN + length:
                break
            start = self._pos + HEADER_LEN
            with memoryview(buf) as view:
                body = bytes(view[start:start + length])
            frames.append((ptype, body))
            self._pos = start + length
            self._header = None
        self._compact()
        return frames

    def _compact(self):
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= self._COMPACT_MIN and self._pos * 2 >= len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0


def decode_json(ptype, body):
    """The JSON object in a frame's body; RequestError when it is anything else."""
    try:
        text = bytes(body).decode('utf-8')
    except UnicodeDecodeError as exc:
        raise RequestError('body of packet %s is not valid UTF-8 (byte %d)' % (ptype, exc.start)) from None
    try:
        # NaN, Infinity and 1e999 would be echoed into answers, records and webhook bodies
        # that strict JSON readers refuse; deep nesting exhausts the stack that encodes them.
        value = _jsonstrict.loads(text)
    except ValueError as exc:
        raise RequestError('body of packet %s is not valid JSON: %s' % (ptype, exc)) from None
    if not isinstance(value, dict):
        raise RequestError('body of packet %s must be a JSON object, not %s'
                           % (ptype, type(value).__name__)) from None
    return value


_ECHO_ID_RE = re.compile(r'"speechID"\s*:\s*"([A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63})"')


def loose_json(body):
    """The fields of a body that failed the checks, to echo them in the error answer:
    a dict when the body is a JSON object at all, else None. Numbers JSON cannot carry
    become null; in a body nested too deeply only the plain top-level fields are kept."""
    try:
        text = bytes(body).decode('utf-8')
        value = json.loads(text, parse_constant=lambda name: None)
    except RecursionError:
        # Too deep even to parse: the speechID alone, so the client can tell which request failed.
        found = _ECHO_ID_RE.search(text)
        return {'speechID': found.group(1)} if found else None
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    if _jsonstrict.depth_over(value):
        value = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
    return _jsonstrict.finite(value)


# The speechID names files (records/webhook/<speechID>), so no path separators,
# no leading dot (hidden files, '.', '..') and a bounded length.
SPEECH_ID_RE = re.compile(r'[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}\Z')
SPEECH_ID_RULE = "speechID must be 1-64 characters of A-Z a-z 0-9 . _ : - not starting with '.'"


def _check_text(req, name, required=False, allow_empty=True):
    """Validate one string field; return True when it is present and non-empty."""
    if name not in req:
        if required:
            raise RequestError('field %s is required' % name)
        return False
    value = req[name]
    if not isinstance(value, str):
        raise RequestError('field %s must be a string, not %s' % (name, _json_type(value)))
    if '\0' in value:
        raise RequestError('field %s must not contain a NUL character' % name)
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        # Lone surrogates from \ud800 escapes cannot be file names or log text.
        raise RequestError('field %s is not valid Unicode text' % name) from None
    if not value and not allow_empty:
        if required:
            raise RequestError('field %s is required' % name)
        raise RequestError('field %s must not be empty' % name)
    return bool(value)


def _json_type(value):
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'a boolean'
    if isinstance(value, (int, float)):
        return 'a number'
    if isinstance(value, dict):
        return 'an object'
    if isinstance(value, list):
        return 'an array'
    return type(value).__name__


def check_transcribe(req):
    """Validate a 1002 body's fields; return it unchanged, extra fields kept.

    Whether the paths lie inside the allowed roots is decided elsewhere; this
    only makes sure every field has a type and a content that can be used.
    """
    if not isinstance(req, dict):
        raise RequestError('the Transcribe body must be a JSON object')
    if 'speechID' in req:
        speech_id = req['speechID']
        if not isinstance(speech_id, str) or not SPEECH_ID_RE.fullmatch(speech_id):
            raise RequestError(SPEECH_ID_RULE)
    _check_text(req, 'filePath', required=True, allow_empty=False)
    has_id = _check_text(req, 'fileID')
    has_name = _check_text(req, 'fileName')
    if not (has_id or has_name):
        raise RequestError('field fileID or fileName is required')
    _check_text(req, 'audioPath', allow_empty=False)
    _check_text(req, 'domainName')
    _check_text(req, 'domainCode')
    if 'segments' in req and not isinstance(req['segments'], bool):
        raise RequestError('field segments must be true or false')
    return req


_id_lock = threading.Lock()
_last_id_time = None


def _reset_id_lock():
    # A lock held by another thread at fork time would stay locked in the child.
    global _id_lock
    _id_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_id_lock)


def new_speech_id(now=None):
    """A speechID `YYYYMMDD_HHMMSS_ffffff` from local time, unique within this process.

    Two calls in the same microsecond (or after the clock stepped back) get the
    last time plus one microsecond, so ids stay unique and increasing.
    """
    global _last_id_time
    if now is None:
        now = datetime.datetime.now()
    elif now.tzinfo is not None:
        now = now.astimezone().replace(tzinfo=None)
    with _id_lock:
        if _last_id_time is not None and now <= _last_id_time:
            now = _last_id_time + datetime.timedelta(microseconds=1)
        _last_id_time = now
    return now.strftime('%Y%m%d_%H%M%S_%f')


def error_body(request, result, state, message):
    """An error response: the request's own fields echoed, plus result, state and message."""
    body = dict(request) if isinstance(request, dict) else {}
    body['result'] = Result(result).value
    body['state'] = State(state).value
    body['message'] = message
    return body
