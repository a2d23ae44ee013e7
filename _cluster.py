"""Cluster mode, the master's side ([cluster] enabled): a task admitted here is handed to the
cluster thread (_cluster_thread.py) and published; tasks the broker gives this node run in the
task table like any other, and their answer goes back to the node holding the client.
The thread talks to the loop only through a deque and a wake-up socketpair.
"""
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import _db
import _packet
from _jobs import Outcome
from _loop import drain, wake_pair
from _packet import RequestError, Type
from _records import FINAL, TaskRecord, stamp
from _states import Result, Source, State
from _tasks import Refused

log = logging.getLogger('master')


@dataclass(eq=False)
class Waiting:
    """A task admitted on this node whose answer comes back from the node that runs it."""
    token: str
    request: dict
    source: Source
    conn: object
    deadline: float
    created: float = 0.0          # wall clock, for the task lists and an HTTP task's records line
    published: bool = False

    @property
    def speech_id(self):
        return self.request['speechID']


def answer_line(wait, body):
    """A records line made of a 2002 answer, for a task whose runner's record did not come back."""
    req = wait.request
    try:
        result = Result(str(body.get('result')))
        state = State(body.get('state') or State.NONE.value)
    except ValueError:
        result, state = Result.ERROR, State.NONE
    return TaskRecord(
        speech_id=req['speechID'], source=wait.source, state=state, result=result, created=wait.created,
        ended=time.time(), marks=[], request={k: v for k, v in req.items() if k != 'speechID'},
        transcript=body.get('transcript') or '', message=body.get('message') or None,
        channels=list(body.get('channels') or ()), duration=body.get('duration'), audio_wav=body.get('audioWAV'),
        audio_mp3=body.get('audioMP3'), segments=body.get('segments'), confidence=body.get('confidence')).to_line()


class Cluster:
    """`admit(req, source, conn, keep_source, file_path)` is the task table's way out for new
    tasks; `answered(task, body)` takes the answer of a task run here for another node; as a
    reporter sink it hands that answer on once the task's record is written (the last sink).
    `web` (a WebLink) is told the records line of an HTTP task admitted here, wherever it ran."""

    def __init__(self, loop, cfg, tasks, capacity, conns, scanner, web=None, stop=None):
        self.loop, self.cfg, self.tasks = loop, cfg, tasks
        self.capacity, self.conns, self.scanner, self.web = capacity, conns, scanner, web
        self.stop_node = stop           # stop(why): the master's graceful stop
        # HTTP tasks admitted and run here: the web process had their records line from the
        # WebLink sink already, so their reply from the queue tells it nothing more.
        self.told = set()
        self.node = _db.node_name(cfg)
        self.token = uuid.uuid4().hex              # this life of the node
        self.waiting = {}                           # speechID -> Waiting (this node holds the client)
        self.unpublished = 0
        self.runs = {}                              # speechID -> (message, handle) run here
        self.answers = {}                           # speechID -> 2002 body, until the record is written
        self.lock = threading.Lock()
        self.events = collections.deque()
        self.view = {}
        self.told_capacity = None
        self.thread = self.wake_r = self.wake_w = None
        self.counters = collections.Counter()

    def start(self):
        import _cluster_thread      # pika is loaded only in cluster mode
        self.wake_r, self.wake_w = wake_pair()
        self.loop.add(self.wake_r, self.on_wake, 'cluster thread')
        self.thread = _cluster_thread.ClusterThread(self.cfg, self.node, self.token, self.post,
                                                    lambda: len(self.waiting))
        self.thread.start()
        self.tick(time.monotonic())

    def fds(self):
        return [s.fileno() for s in (self.wake_r, self.wake_w) if s is not None]

    def post(self, event):
        """From the cluster thread: queue an event and wake the loop."""
        self.events.append(event)
        try:
            self.wake_w.send(b'c')
        except BlockingIOError:
            pass        # a wake-up byte is waiting already

    # ------------------------------------------------------------ origin: admission and answers

    def admit(self, req, source, conn=None, keep_source=False, file_path=None):
        sid = req['speechID']
        if sid in self.waiting:
            raise Refused(Result.ALREADY_CONNECTED, 'speechID %s is already in progress' % sid)
        if self.unpublished >= self.tasks.max_tasks:
            raise Refused(Result.TOO_MANY, 'max_tasks (%d) tasks already wait for the cluster\'s queue'
                          % self.tasks.max_tasks)
        try:
            self.tasks.make_job(req, keep_source, file_path)       # paths checked here, as for a local task
        except RequestError as exc:
            raise Refused(Result.BAD_REQUEST, exc.message) from None
        wait = Waiting(uuid.uuid4().hex, req, source, conn, time.monotonic() + self.tasks.timeout, time.time())
        self.waiting[sid] = wait
        if conn is not None:
            conn.tasks.add(sid)
        self.unpublished += 1
        self.counters['admitted'] += 1
        self.thread.put(('submit', {'speechID': sid, 'token': wait.token, 'request': req, 'source': source.value,
                                    'keepSource': keep_source, 'filePathRaw': file_path, 'origin': self.node,
                                    'reply': self.thread.names['reply'], 'created': time.time()}))
        log.info('master: speechID=%s accepted from %s for the cluster', sid,
                 conn.name if conn is not None else source)
        return wait

    def _published(self, sid, token):
        wait = self.waiting.get(sid)
        if wait is not None and wait.token == token and not wait.published:
            wait.published = True
            self.unpublished -= 1

    def _refused(self, sid, token, answer=None):
        wait = self.waiting.get(sid)
        if wait is None or wait.token != token:
            return
        self._drop(sid, wait)
        if answer is not None:
            # A claimed file whose task ended already (its claimer died before moving it out).
            log.info('master: speechID=%s was recorded already; the scanner moves the file out', sid)
            self.reply(wait, answer)
            return
        # A scanned file whose speechID runs elsewhere stays claimed and is tried again later.
        result = Result.UNAVAILABLE if wait.source == Source.SCANNER else Result.ALREADY_CONNECTED
        self.reject(wait, result, 'speechID %s is already in progress in the cluster' % sid)

    def _answer(self, sid, token, body, record=None):
        wait = self.waiting.get(sid)
        if wait is None or wait.token != token:
            return      # answered already (a redelivered task's second answer), or timed out
        self._drop(sid, wait)
        self.counters['answered'] += 1
        self.reply(wait, body, record)

    def reply(self, wait, body, record=None):
        """Hand the answer of a task admitted here to whoever waits for it; `record`: the runner's
        record (a dict) of an HTTP task, when it came with the answer."""
        sid = wait.speech_id
        if wait.source == Source.SCANNER:
            # Its record is written (by whichever node ran it): the scanner may move the file out.
            self.scanner.tell((sid, body.get('result'), body.get('state'), body.get('message') or ''))
        elif wait.source == Source.HTTP:
            self.tell_web(wait, body, record)
        elif wait.conn is not None and not wait.conn.closed:
            wait.conn.tasks.discard(sid)
            self.conns.send(wait.conn, Type.TRANSCRIBE_RESP, body)

    def reject(self, wait, result, message):
        log.warning('master: speechID=%s: %s: %s', wait.speech_id, result.value, message)
        if wait.source == Source.SCANNER:
            self.scanner.refused(wait.speech_id, result, message)
        else:
            self.reply(wait, _packet.error_body(wait.request, result, State.NONE, message))

    def tell_web(self, wait, body, record=None):
        """The web process waits for an HTTP task's records line (its answer, and the sign that its
        upload may go): the runner's record when it came with the answer, else one made of the
        answer (a timeout, a refusal, an answer stored in the task's row)."""
        sid = wait.speech_id
        if sid in self.told:
            self.told.discard(sid)
            return
        if self.web is None:
            return
        line = None
        if record is not None:
            try:
                line = TaskRecord.from_dict(record).to_line()
            except (ValueError, KeyError, TypeError) as exc:
                log.error('master: speechID=%s: the runner\'s record is unreadable (%s); answering from its 2002',
                          sid, exc)
        self.web.post(line or answer_line(wait, body))

    def _drop(self, sid, wait):
        del self.waiting[sid]
        if not wait.published:
            self.unpublished -= 1

    def task_rows(self, exclude=()):
        """The web's rows of tasks admitted here that wait for the cluster (queued, or running on
        some node); `exclude`: speechIDs the task table lists already (run here)."""
        return [{'speechID': sid, 'state': State.INIT.value, 'source': w.source.value, 'startTime': stamp(w.created),
                 'created': w.created, 'worker': None, 'fileID': w.request.get('fileID'),
                 'filePath': w.request.get('filePath')}
                for sid, w in self.waiting.items() if sid not in exclude]

    # ------------------------------------------------------------ runner: tasks of the queue run here

    def _run(self, msg, handle, attempts, dead=False):
        sid = msg['speechID']
        try:
            task = self.tasks.admit(msg['request'], Source(msg['source']), keep_source=msg.get('keepSource'),
                                    file_path=msg.get('filePathRaw'), origin=msg)
        except Refused as exc:
            # This node cannot take a task now (stopping, no engine, records not writable): another
            # node can, and this one takes nothing more meanwhile (tick() sets its prefetch to 0).
            log.warning('master: speechID=%s from the cluster not taken here (%s: %s); back to the queue',
                        sid, exc.result.value, exc.message)
            self.counters['givenBack'] += 1
            self.thread.put(('unrun', msg, handle))
            return
        self.runs[sid] = (msg, handle)
        if task.unrunnable:
            # Its paths are outside this node's roots: it ends here, with its record; sent back to the
            # queue it would only come back.
            self.counters['refusedRuns'] += 1
            self.tasks.end(task, Outcome.failed(State.ERROR, Result.BAD_REQUEST, 'node %s cannot run it: %s' % (
                self.node, task.unrunnable)))
            return
        if attempts and attempts > 1:
            log.warning('master: speechID=%s: run %d (the node of an earlier run died)', sid, attempts)
        if dead:
            self.tasks.end(task, Outcome.failed(State.ERROR, Result.ERROR, (
                'the task was started %d time(s) and the node running it died each time' % attempts)))

    def answered(self, task, body):
        """TaskTable's answer of a task run here for the cluster: kept for the sink."""
        with self.lock:
            self.answers[task.speech_id] = body
        return None

    def handle(self, event, record):
        """Reporter sink, the last one: the record, row and webhook of the task exist now."""
        if event != FINAL:
            return
        with self.lock:
            body = self.answers.pop(record.speech_id, None)
        if body is not None:
            self.post(('ended', record.speech_id, body, record.to_dict()))

    def _ended(self, sid, body, record):
        run = self.runs.pop(sid, None)
        if run is not None:
            if run[0].get('origin') == self.node and sid in self.waiting and self.waiting[sid].source == Source.HTTP:
                self.told.add(sid)
            self.thread.put(('finish', run[0], run[1], body, record))

    def stopped(self, task):
        """A task run here cut short by a stop: back to the queue for another node, no record."""
        run = self.runs.pop(task.speech_id, None)
        if run is not None:
            self.thread.put(('unrun', run[0], run[1]))

    # ------------------------------------------------------------ the loop

    def on_wake(self, mask):
        drain(self.wake_r)
        while self.events:
            event = self.events.popleft()
            kind = event[0]
            if kind == 'run':
                self._run(*event[1:])
            elif kind == 'dead':
                self._run(*event[1:], dead=True)
            elif kind == 'answer':
                self._answer(*event[1:])
            elif kind == 'ended':
                self._ended(*event[1:])
            elif kind == 'published':
                self._published(*event[1:])
            elif kind == 'refused':
                self._refused(*event[1:])
            elif kind == 'view':
                self.view = event[1]
            elif kind == 'name taken':
                self.name_taken()

    def name_taken(self):
        """Another live node has this node's name (the thread said so in the log): stop."""
        self.counters['nameTaken'] += 1
        if self.stop_node is not None:
            self.stop_node('cluster node name %s in use by another live node' % self.node)

    def tick(self, now):
        # A stopping node takes nothing more from the queue.
        capacity = 0 if self.tasks.stopping() else max(0, min(self.capacity(), self.tasks.max_tasks))
        if capacity != self.told_capacity:
            self.told_capacity = capacity
            self.thread.put(('capacity', capacity))
        for sid, wait in list(self.waiting.items()):
            if now >= wait.deadline:
                self._drop(sid, wait)
                self.counters['timedOut'] += 1
                self.reject(wait, Result.TIMEOUT, 'no answer from the cluster within session_timeout_secs (%g s)'
                            % self.tasks.timeout)

    def idle(self):
        return not self.waiting

    def end_waiting(self, message):
        """At the end of a stop: the clients still waiting get result 3."""
        for sid, wait in list(self.waiting.items()):
            self._drop(sid, wait)
            self.reject(wait, Result.UNAVAILABLE, message)

    def describe(self):
        """Monitor's `cluster` part: every node (from the database) and this node's share."""
        return dict(self.view, node=self.node, brokerUp=bool(self.thread and self.thread.conn is not None),
                    waiting=len(self.waiting), unpublished=self.unpublished, runningHere=len(self.runs),
                    capacity=self.told_capacity, counters=dict(self.counters))

    def stop(self):
        if self.thread is not None:
            self.thread.stop()
        for s in (self.wake_r, self.wake_w):
            if s is not None:
                if s is self.wake_r:
                    self.loop.remove(s)
                s.close()
