"""The broker of remote engines: the legacy engine (sgsas_lstm) logs in over the protocol
(1001/2001), is sent a Recognize (3001) for each task whose audio a worker prepared, and
answers with a 4001. Engines are chosen least busy first, within engine_concurrency; an
engine that leaves hands its unanswered tasks to another one, or they end with result 3.
"""
import collections
import logging
import time
from dataclasses import dataclass, field

import _packet
import _segments
from _jobs import Outcome
from _packet import RequestError, Type
from _records import stamp
from _states import Mark, Result, State

log = logging.getLogger('master')

ENGINE_NAME = 'sttengine'


@dataclass(eq=False)
class EngineConn:
    """A remote engine logged in on `conn`."""
    conn: object
    login_time: float
    inflight: dict = field(default_factory=dict)   # speechID -> monotonic time of its 3001
    answered: int = 0

    @property
    def key(self):
        return '%s@%s' % (ENGINE_NAME, self.conn.name)


class EngineBroker:
    """`send(conn, type, body)` writes a frame; `on_change()` hears when engines come or go."""

    def __init__(self, cfg, engine, tasks, send, on_change):
        self.tasks = tasks
        self.send = send
        self.on_change = on_change
        self.engines = {}                           # Conn -> EngineConn
        self.queue = collections.deque()            # speechIDs prepared, waiting for a free engine
        self.counters = tasks.counters
        self.configure(cfg, engine)

    def configure(self, cfg, engine):
        self.engine = engine
        e, s = cfg['engine'], cfg['server']
        self.slots = int(e['engine_slots'])
        self.concurrency = int(e['engine_concurrency'])
        self.seqs = {'serverSeq': int(s['server_seq']), 'domainSeq': int(s['domain_seq']),
                     'imageSeq': int(s['image_seq'])}

    @property
    def available(self):
        return bool(self.engines)

    # ------------------------------------------------------------ login

    def on_login(self, conn, body):
        name = body.decode('utf-8', 'replace').strip().strip('\x00')
        if self.engine.embedded:
            code, why = Result.UNSUPPORTED, 'this node runs the embedded %s engine' % self.engine.name
        elif name != ENGINE_NAME:
            code, why = Result.UNSUPPORTED, 'unknown engine name'
        elif conn.engine is not None or len(self.engines) >= self.slots:
            code, why = Result.ALREADY_CONNECTED, 'all %d engine slot(s) are taken' % self.slots
        else:
            code, why = Result.OK, None
        if code != Result.OK:
            log.warning('master: %s: engine login %r refused with %s: %s', conn.name, name[:64], code.value, why)
            self.send(conn, Type.LOGIN_RESP, code.value)
            return
        conn.engine = EngineConn(conn, time.time())
        self.engines[conn] = conn.engine
        log.info('master: engine %s logged in (%d of %d slot(s))', conn.name, len(self.engines), self.slots)
        self.send(conn, Type.LOGIN_RESP, Result.OK.value)
        self.on_change()
        self.dispatch()

    # ------------------------------------------------------------ 3001 out

    def prepared(self, task, outcome):
        """A worker prepared the audio of a task: queue its 3001."""
        task.prepared = outcome
        task.mark(Mark.WORKER_DONE)
        if not self.engines:
            self.tasks.end(task, Outcome.failed(State.ERROR, Result.UNAVAILABLE, 'no engine is logged in'))
            return
        self.tasks.move(task, State.RECOGNIZE)
        self.queue.append(task.speech_id)
        self.dispatch()

    def dispatch(self):
        while self.queue:
            free = [e for e in self.engines.values() if len(e.inflight) < self.concurrency]
            if not free:
                return
            eng = min(free, key=lambda e: (len(e.inflight), e.login_time))
            task = self.tasks.get(self.queue.popleft())
            if task is None:
                continue
            self.tasks.assign_seq(task)
            prepared = task.prepared
            body = {k: v for k, v in task.request.items() if k != 'keepSource'}
            body.update(seq=task.seq, **self.seqs)
            body.update(audioPath=task.job.audio_path, audioWAV=prepared.audio_wav or '',
                        audioMP3=prepared.audio_mp3 or '', channels=prepared.source_channels or 1)
            eng.inflight[task.speech_id] = time.monotonic()
            task.engine = eng
            task.mark(Mark.STT_SEND)
            self.send(eng.conn, Type.RECOGNIZE, body)

    # ------------------------------------------------------------ 4001 in

    def on_recognized(self, conn, body):
        eng = conn.engine
        if eng is None:
            log.warning('master: %s sent a 4001 without logging in as an engine; ignored', conn.name)
            return
        try:
            msg = _packet.decode_json(Type.RECOGNIZE_RESP, body)
        except RequestError as exc:
            log.warning('master: engine %s sent a bad 4001 (%s); dropped', conn.name, exc.message)
            return
        sid = msg.get('speechID')
        if not isinstance(sid, str) or sid not in eng.inflight:
            if isinstance(sid, str) and sid in self.tasks.recently_ended:
                log.warning('master: late 4001 from %s for speechID=%s (the task already ended %s); dropped',
                            conn.name, sid, self.tasks.recently_ended[sid])
            else:
                log.warning('master: 4001 from %s for unknown speechID=%r; dropped', conn.name, sid)
            self.counters['engine_dropped'] += 1
            return
        del eng.inflight[sid]
        eng.answered += 1
        task = self.tasks.get(sid)
        task.engine = None
        task.mark(Mark.STT_RECV)
        self.tasks.end(task, self.outcome(conn, sid, msg, task.prepared, task.job.low_confidence))
        self.dispatch()

    @staticmethod
    def outcome(conn, sid, msg, prepared, low_confidence=0.0):
        """The task's Outcome from a 4001 and the worker's prepared files."""
        result = str(msg.get('result', Result.ERROR.value))
        if result not in Result._value2member_map_:
            log.warning('master: engine %s answered speechID=%s with unknown result %r; using 9', conn.name, sid, result)
            result = Result.ERROR.value
        transcript = msg.get('transcript', msg.get('transcipt', ''))
        ok = result == Result.OK.value
        segments = None
        if ok and msg.get('segments') is not None:
            try:
                segments = _segments.from_engine(msg['segments'], low_confidence)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning('master: engine %s sent unusable segments for speechID=%s (%s); ignored',
                            conn.name, sid, exc)
        return Outcome(
            state=State.DONE if ok else State.ERROR, result=Result(result),
            message=None if ok else (msg.get('message') or 'the engine answered with result %s' % result),
            transcript=transcript if isinstance(transcript, str) else '',
            duration=prepared.duration, source_channels=prepared.source_channels,
            audio_wav=prepared.audio_wav, audio_mp3=prepared.audio_mp3,
            segments=segments, confidence=_segments.mean_confidence(segments))

    # ------------------------------------------------------------ losses and ends

    def lost(self, conn):
        """An engine connection closed: its unanswered tasks go to another engine, or end with 3."""
        eng = conn.engine
        self.engines.pop(conn, None)
        orphans = [sid for sid in eng.inflight if sid in self.tasks]
        eng.inflight.clear()
        log.warning('master: engine %s disconnected with %d task(s) in flight; %d engine(s) left',
                    conn.name, len(orphans), len(self.engines))
        for sid in orphans:
            self.tasks.get(sid).engine = None
        if self.engines:
            self.queue.extendleft(reversed(orphans))
            self.dispatch()
        else:
            for sid in orphans + list(self.queue):
                task = self.tasks.get(sid)
                if task is not None:
                    self.tasks.end(task, Outcome.failed(
                        State.ERROR, Result.UNAVAILABLE, 'the engine disconnected and no other engine is logged in'))
            self.queue.clear()
        self.on_change()

    def release(self, task):
        """A task ended (timeout, stop): its engine no longer holds it."""
        if task.engine is not None:
            task.engine.inflight.pop(task.speech_id, None)
            task.engine = None

    def describe(self):
        """Monitor's entries for the logged-in engines."""
        return {eng.key: {'address': eng.conn.name, 'loginTime': stamp(eng.login_time),
                          'inflight': len(eng.inflight), 'answered': eng.answered}
                for eng in self.engines.values()}
