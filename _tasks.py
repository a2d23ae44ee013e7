"""The master's task table: admission (one way in for every source), the queue of tasks
waiting for a worker, every state move through one checked method, deadlines, the task's
number (seq), and the end of a task: its answer, its TaskRecord for the reporter.
"""
import collections
import logging
import os
import time
from dataclasses import dataclass, field

import _config
import _packet
import _safepath
from _jobs import Job, Outcome
from _packet import RequestError
from _records import ACCEPTED, FINAL, STATE, TaskRecord, last_seq, stamp
from _states import Mark, Result, Source, State, can_move

log = logging.getLogger('master')

RECENTLY_ENDED = 10000
# Finished tasks Monitor lists under `recent`, newest last.
RECENT_SHOWN = 20


class Refused(Exception):
    """A request that does not become a task: the result code and message of its answer."""

    def __init__(self, result, message):
        super().__init__(message)
        self.result, self.message = Result(result), message


@dataclass(eq=False)
class Task:
    speech_id: str
    request: dict
    source: Source
    conn: object              # who waits for the answer (a client Conn), or None
    created: float            # wall clock, for startTime
    t0: float                 # monotonic, for processInterval and deadlines
    deadline: float
    job: Job
    socket_fd: int = None
    state: State = State.INIT
    marks: list = field(default_factory=list)     # [(Mark, seconds since t0)]
    worker: int = None
    attempts: int = 0
    engine: object = None     # the remote engine that holds this task's 3001
    prepared: Outcome = None  # the worker's prepared files, for the 3001
    seq: int = None
    origin: dict = None       # cluster mode: the broker's message of a task run here for the cluster
    unrunnable: str = None    # cluster mode: why this node cannot run it (its roots refuse the paths)

    def mark(self, what, now=None):
        now = time.monotonic() if now is None else now
        self.marks.append((Mark(what), now - self.t0))

    def handed_to(self, worker):
        self.worker = worker
        self.mark(Mark.WORKER_PUT)


def answer_body(task, outcome, state, result):
    """The 2002 answer of a finished task, byte for byte what 1.0 clients know."""
    if result != Result.OK:
        return _packet.error_body(task.request, result, state, outcome.message or '')
    body = {'result': result.value, 'state': state.value, 'speechID': task.speech_id,
            'transcript': outcome.transcript}
    if outcome.channels:        # a remote engine's answer has no per-channel texts
        body['channels'] = outcome.channels
    body.update(duration=outcome.duration, audioWAV=outcome.audio_wav, audioMP3=outcome.audio_mp3)
    body['transcipt'] = outcome.transcript
    if wants_segments(task.request):
        # Only on request ("segments": true): a 1.0 client's answer stays byte for byte the same.
        body['segments'] = outcome.segments or []
        body['confidence'] = outcome.confidence
    return body


def wants_segments(request):
    return request.get('segments') is True


def build_record(task, outcome, state, result, ended=None):
    """The one TaskRecord of a task that ended with `outcome` in `state`/`result`."""
    return TaskRecord(
        speech_id=task.speech_id, source=task.source, state=state, result=result,
        created=task.created, ended=time.time() if ended is None else ended, marks=list(task.marks),
        request={k: v for k, v in task.request.items() if k != 'speechID'}, audio_path=task.job.audio_path,
        transcript=outcome.transcript or '', message=outcome.message, channels=list(outcome.channels or ()),
        source_channels=outcome.source_channels, duration=outcome.duration, audio_wav=outcome.audio_wav,
        audio_mp3=outcome.audio_mp3, worker=task.worker, socket=task.socket_fd, seq=task.seq,
        engine_result=outcome.result.value if result == Result.DISCONNECTED else None,
        segments=outcome.segments, confidence=outcome.confidence)


class TaskTable:
    """Owns every task between admission and its end.

    `stopping()` and `engine_up()` say whether tasks can be admitted at all;
    `answer(task, body)` delivers a 2002 and returns True, False when the client left, None
    when nobody waits (scanned files); `released(task)` lets the pool and the engine broker
    forget a task that ended; `row_id(speechID)` is the database's row id, if any.
    """

    def __init__(self, cfg, submit, stopping, engine_up, answer, released, row_id=lambda sid: None):
        self.submit = submit
        self.stopping = stopping
        self.engine_up = engine_up
        self.answer = answer
        self.released = released
        self.row_id = row_id
        self.tasks = {}
        self.pending = collections.deque()
        self.counters = collections.Counter()
        self.recently_ended = collections.OrderedDict()   # speechID -> final state, to explain late 4001s
        self.recent = collections.deque(maxlen=RECENT_SHOWN)  # Monitor's last finished tasks
        self.seq_day, self.seq = None, 0
        # Why a record could not be written now (the reporter's trouble), else None: a task
        # taken then would end with no record, so none is taken.
        self.cannot_record = lambda: None
        # Cluster mode: where a new task goes instead of this table (it runs wherever the broker says).
        self.forward = None
        self.configure(cfg)

    def configure(self, cfg):
        self.cfg = cfg
        self.max_tasks = int(cfg['setting']['max_tasks'])
        self.timeout = float(cfg['setting']['session_timeout_secs'])
        self.roots = _config.task_roots(cfg)
        self.records_dir = _config.records_dir(cfg)

    def __len__(self):
        return len(self.tasks)

    def __contains__(self, sid):
        return sid in self.tasks

    def get(self, sid):
        return self.tasks.get(sid)

    def values(self):
        return list(self.tasks.values())

    # ------------------------------------------------------------ admission

    def admit(self, req, source, conn=None, keep_source=False, file_path=None, origin=None):
        """Make a task of a checked request; Refused says why not. `file_path`: the real
        filePath when the request's is only its UTF-8 rendering (a scanned folder's name);
        `origin`: the cluster's message of a task given to this node to run; one whose paths
        this node's roots refuse is a task all the same, with the reason in `unrunnable`, so
        that it can end here with its record."""
        if self.stopping():
            raise Refused(Result.UNAVAILABLE, 'the service manager is shutting down')
        trouble = self.cannot_record()
        if trouble:
            raise Refused(Result.UNAVAILABLE, 'usage records cannot be written (%s): no task is taken until '
                          'they can' % trouble)
        sid = req.get('speechID')
        if sid is None:
            sid = req['speechID'] = _packet.new_speech_id()
        if sid in self.tasks:
            raise Refused(Result.ALREADY_CONNECTED, 'speechID %s is already in progress' % sid)
        if self.forward is not None and origin is None:
            return self.forward(req, source, conn, keep_source, file_path)
        if not self.engine_up():
            raise Refused(Result.UNAVAILABLE, 'no engine is available')
        if len(self.tasks) >= self.max_tasks:
            raise Refused(Result.TOO_MANY, 'max_tasks (%d) tasks are already queued or running' % self.max_tasks)
        try:
            job = self.make_job(req, keep_source, file_path)
        except RequestError as exc:
            if origin is None:
                raise Refused(Result.BAD_REQUEST, exc.message) from None
            # A cluster task another node accepted and this one refuses (its roots differ).
            job = Job(speech_id=sid, candidates=[], roots=self.roots, audio_path=None, stem=sid)
            refused = exc.message
        else:
            refused = None
        now, mono = time.time(), time.monotonic()
        task = Task(sid, req, source, conn, now, mono, mono + self.timeout, job,
                    socket_fd=conn.sock.fileno() if conn is not None else None, origin=origin,
                    unrunnable=refused)
        task.mark(Mark.TRANSCRIBE_START, mono)
        self.tasks[sid] = task
        if conn is not None:
            conn.tasks.add(sid)
        self.pending.append(sid)
        self.counters['accepted'] += 1
        self.submit(ACCEPTED, {
            'speechID': sid, 'source': source.value, 'state': task.state.value,
            'startTime': stamp(task.created), 'created': task.created,
            'request': {k: v for k, v in req.items() if k != 'speechID'}, 'audioPath': job.audio_path})
        if task.unrunnable:
            return task         # the cluster ends it at once (_cluster.Cluster._run)
        log.info('master: speechID=%s accepted from %s (%s)', sid, conn.name if conn is not None else source,
                 _safepath.text(job.candidates[0]))
        return task

    def inside_roots(self, path):
        try:
            real = os.path.realpath(path)
        except OSError:
            # A link replaced while realpath() reads it: nothing can be said of this path.
            return False
        return _config.inside(real, self.roots)

    def make_job(self, req, keep_source=False, file_path=None):
        """The worker's job for a request; paths are checked against the roots here."""
        base = file_path or req['filePath']
        if not os.path.isabs(base):
            raise RequestError('filePath must be an absolute path: %s' % base)
        candidates = []
        for key in ('fileID', 'fileName'):
            name = req.get(key)
            if name:
                candidates.append(os.path.normpath(os.path.join(base, name)))
        for path in candidates:
            if not self.inside_roots(path):
                raise RequestError('%s is outside the allowed roots' % path)
        audio_path = req.get('audioPath') or os.path.join(
            self.cfg['directory']['audio_target_path'], time.strftime('%Y%m%d'))
        if not os.path.isabs(audio_path):
            raise RequestError('audioPath must be an absolute path: %s' % audio_path)
        if not self.inside_roots(audio_path):
            raise RequestError('audioPath %s is outside the allowed roots' % audio_path)
        t = self.cfg['task']
        return Job(speech_id=req['speechID'], candidates=candidates, roots=self.roots,
                   audio_path=os.path.normpath(audio_path), stem=req['speechID'],
                   mp3_backup=bool(t['mp3_backup']), keep_wav=bool(t['keep_wav']),
                   source_after=t['source_after'], keep_source=keep_source or bool(req.get('keepSource')),
                   error_backup_path=t['error_backup_path'], subtitles=tuple(t['subtitles']),
                   low_confidence=float(t['low_confidence']))

    # ------------------------------------------------------------ the queue and the moves

    def next_pending(self):
        """The next task waiting for a worker, or None."""
        while self.pending:
            task = self.tasks.get(self.pending.popleft())
            if task is not None:
                return task
        return None

    def requeue(self, task):
        """Put a task back at the front of the queue (its hand-over failed, or a retry)."""
        self.pending.appendleft(task.speech_id)

    def move(self, task, new, retry=False):
        """The one way a running task changes state; an illegal move is refused and logged."""
        new = State(new)
        if new == task.state:
            return False
        if not can_move(task.state, new, retry):
            log.warning('master: speechID=%s: refused move %s -> %s', task.speech_id, task.state.value, new.value)
            return False
        if task.state == State.INIT and not retry and not new.final and task.worker is not None:
            task.mark(Mark.WORKER_GET)
        task.state = new
        if not new.final and not retry:
            self.submit(STATE, {'speechID': task.speech_id, 'state': new.value, 'worker': task.worker,
                                'at': time.time()})
        return True

    def worker_lost(self, task, reason, retries):
        """A task whose worker died: queued again at the front (state INIT) while it has
        retries and time left, else ended with result 9."""
        task.attempts += 1
        task.worker = None
        if task.attempts <= retries and time.monotonic() < task.deadline:
            log.warning('master: speechID=%s: retrying on another worker (%s)', task.speech_id, reason)
            self.move(task, State.INIT, retry=True)
            self.requeue(task)
        else:
            self.end(task, Outcome.failed(State.ERROR, Result.ERROR, 'the worker processing this task %s' % reason))

    def expired(self, now):
        return [t for t in self.tasks.values() if now >= t.deadline]

    # ------------------------------------------------------------ numbers

    def next_seq(self):
        """The per-day task counter sent as seq in 3001 when no database gives a row id."""
        day = time.strftime('%Y%m%d')
        if day != self.seq_day:
            self.seq_day = day
            self.seq = last_seq(self.records_dir, day)
        self.seq += 1
        return self.seq

    def assign_seq(self, task):
        """A task's number (3001 seq, records, webhook): its database row id when the
        database has written the row, else the per-day counter."""
        if task.seq is None:
            task.seq = self.row_id(task.speech_id) or self.next_seq()

    # ------------------------------------------------------------ the end

    def end(self, task, outcome):
        """End a task with `outcome` (None: a scanned file cut short by a stop, left claimed
        with no answer and no record, for the next start)."""
        if self.tasks.pop(task.speech_id, None) is None:
            return
        try:
            self.pending.remove(task.speech_id)
        except ValueError:
            pass
        self.released(task)
        if task.conn is not None:
            task.conn.tasks.discard(task.speech_id)
        if outcome is None:
            log.info('master: speechID=%s left claimed for the next start', task.speech_id)
            return
        self.assign_seq(task)
        state, result = State(outcome.state), Result(outcome.result)
        self.recently_ended[task.speech_id] = state.value
        if len(self.recently_ended) > RECENTLY_ENDED:
            self.recently_ended.popitem(last=False)
        self.move(task, state)
        task.mark(Mark.TRANSCRIBE_END)
        if self.answer(task, answer_body(task, outcome, state, result)) is False:
            result = Result.DISCONNECTED
        self.counters['result_' + result.value] += 1
        self.recent.append({'speechID': task.speech_id, 'endTime': stamp(), 'state': state.value,
                            'result': result.value, 'confidence': outcome.confidence})
        level = logging.INFO if result == Result.OK else logging.WARNING
        log.log(level, 'master: speechID=%s ended %s/%s%s', task.speech_id, state.value, result.value,
                ': ' + outcome.message if outcome.message else '')
        self.submit(FINAL, build_record(task, outcome, state, result))

    def describe_recent(self):
        """Monitor's `recent`: the last finished tasks with their mean confidence."""
        return list(self.recent)

    def describe(self):
        """Monitor's task list."""
        return [{'speechID': t.speech_id, 'startTime': stamp(t.created), 'state': t.state.value}
                for t in self.tasks.values()]
