"""Named task states, result codes and processInterval marks of the svcmgr protocol.

This module imports nothing of the project, so every process and test can use it
(the model is supervisor's states.py).
"""
from enum import Enum


class State(str, Enum):
    """Task states as PROTOCOL.md names them; the value is what goes on the wire."""
    NONE = 'NONE'
    INIT = 'INIT'
    CONVERT = 'CONVERT'
    RECOGNIZE = 'RECOGNIZE'
    DONE = 'DONE'
    NOFILE_ID = 'NOFILE_ID'
    NOFILE_WAV = 'NOFILE_WAV'
    NOFILE_MP3 = 'NOFILE_MP3'
    UNKNOWN_FORMAT = 'UNKNOWN_FORMAT'
    TIMEOUT = 'TIMEOUT'
    ERROR = 'ERROR'

    def __str__(self):
        return self.value

    @property
    def final(self):
        return self not in (State.NONE, State.INIT, State.CONVERT, State.RECOGNIZE)


# A running task may only move forward along this order; final states end it.
RUNNING_ORDER = (State.INIT, State.CONVERT, State.RECOGNIZE)


def can_move(old, new):
    """True when a task in state `old` may move to state `new`."""
    if old.final:
        return False
    if new.final:
        return True
    return RUNNING_ORDER.index(new) >= RUNNING_ORDER.index(old)


class Result(str, Enum):
    """Result codes; they travel as JSON strings ("0"), as in 1.0."""
    OK = '0'
    ALREADY_CONNECTED = '1'
    UNSUPPORTED = '2'
    UNAVAILABLE = '3'
    NOT_FOUND = '4'
    TIMEOUT = '5'
    TOO_MANY = '6'
    BAD_REQUEST = '7'
    DISCONNECTED = '8'
    ERROR = '9'

    def __str__(self):
        return self.value


class Mark(str, Enum):
    """The steps stamped into a task's processInterval."""
    TRANSCRIBE_START = 'TRANSCRIBE_START'
    WORKER_PUT = 'WORKER_PUT'
    WORKER_GET = 'WORKER_GET'
    WORKER_DONE = 'WORKER_DONE'     # (new) a worker prepared the audio for a remote engine
    STT_SEND = 'STT_SEND'
    STT_RECV = 'STT_RECV'
    TRANSCRIBE_END = 'TRANSCRIBE_END'

    def __str__(self):
        return self.value


class Source(str, Enum):
    """Where a task came from."""
    CLIENT = 'client'
    SCANNER = 'scanner'

    def __str__(self):
        return self.value
