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


# The moves of a running task: forward along INIT -> CONVERT -> RECOGNIZE (RECOGNIZE straight
# from INIT when a worker reports it first), back to INIT only to retry on another worker, and
# into any final state. A final state never moves again (supervisor's states.py idea).
_FORWARD = {
    State.INIT: (State.CONVERT, State.RECOGNIZE),
    State.CONVERT: (State.RECOGNIZE,),
    State.RECOGNIZE: (),
}


def can_move(old, new, retry=False):
    """True when a task in state `old` may move to state `new` (`retry`: back to INIT)."""
    if old.final or old not in _FORWARD:
        return False
    if new.final:
        return True
    if retry:
        return new == State.INIT and old != State.INIT
    return new in _FORWARD[old]


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
    HTTP = 'http'

    def __str__(self):
        return self.value


class WorkerMsg(str, Enum):
    """What a worker sends the master on its pipe: (kind, speechID, payload)."""
    STATE = 'state'         # payload: the State the task moved to
    DONE = 'done'           # payload: the Outcome
    LEAVING = 'leaving'     # payload: why the worker leaves after this task (recycling), sent before DONE


class LinkMsg(str, Enum):
    """Kinds of the JSON-line messages between the master and its helper processes
    (scanner, web): each line is [kind, ...]."""
    SUBMIT = 'submit'       # child -> master: a request to admit
    STATUS = 'status'       # child -> master: what Monitor shows of the child
    REJECTED = 'rejected'   # master -> child: a submitted request was not admitted
    ADMITTED = 'admitted'   # master -> child: a submitted request became a task
    ENDED = 'ended'         # master -> child: a task ended and its record is written
    ENGINE = 'engine'       # master -> child: whether an engine is available
    SNAPSHOT = 'snapshot'   # master -> child: the state Monitor shows, for the web
    STOP = 'stop'           # master -> child: finish and leave
