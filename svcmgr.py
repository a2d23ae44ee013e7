#!/usr/bin/env python3
"""svcmgr, the Service Manager for batch speech-to-text: the command line (start,
stop, restart, status, reload, run, and the transcribe/monitor client commands)
and the master process with its selectors loop, admission, supervision and stop.
"""
import argparse
import collections
import errno
import ipaddress
import json
import logging
import multiprocessing
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import _children
import _config
import _db
import _engine
import _packet
import _records
import _scanner
import _webhook
import _worker
from _monitor import Monitor
from _packet import ProtocolError, RequestError, Type
from _states import Mark, Result, Source, State, can_move

log = logging.getLogger('master')

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INI = os.path.join(HERE, 'app.ini')
MP = multiprocessing.get_context('fork')

# A worker that exits this soon after it started failed to boot: respawning it at
# once would only make it fail again in a loop (gunicorn's WORKER_BOOT_ERROR idea).
BOOT_GRACE_SECS = 2.0
MAX_RESPAWN_DELAY_SECS = 30.0
HEARTBEAT_SLOTS = 1024
MAX_SEND_BUFFER = 16 << 20
TICK_SECS = 0.1


# ---------------------------------------------------------------- master state

@dataclass(eq=False)
class Conn:
    sock: socket.socket
    addr: tuple
    decoder: _packet.FrameDecoder
    wbuf: bytearray = field(default_factory=bytearray)
    tasks: set = field(default_factory=set)
    partial_since: float = None
    closing: bool = False
    closed: bool = False
    engine: object = None     # EngineConn once a remote engine logged in on this connection
    frames: int = 0           # whole frames received
    opened: float = field(default_factory=time.monotonic)

    @property
    def name(self):
        return '%s:%s' % self.addr[:2] if isinstance(self.addr, tuple) else str(self.addr)


@dataclass(eq=False)
class Task:
    speech_id: str
    request: dict
    source: Source
    conn: Conn
    created: float            # wall clock, for startTime
    t0: float                 # monotonic, for processInterval and deadlines
    deadline: float
    job: dict
    socket_fd: int = None
    state: State = State.INIT
    marks: list = field(default_factory=list)
    worker: int = None
    attempts: int = 0
    engine: object = None     # the EngineConn that holds this task's 3001
    prepared: dict = None     # the worker's prepared files, for the 3001
    seq: int = None

    def mark(self, what, now=None):
        now = time.monotonic() if now is None else now
        self.marks.append('%.6f < %s' % (now - self.t0, what))


@dataclass(eq=False)
class WorkerSlot:
    number: int               # 1..N, as in "svcmgr: worker 2"
    hb_index: int
    proc: object
    conn: object
    started: float
    task: str = None          # speechID in hand
    task_since: float = None
    retiring: bool = False
    done: int = 0
    killed_reason: str = None
    pipe_open: bool = True
    told_to_leave: bool = False


@dataclass(eq=False)
class EngineConn:
    """A remote engine logged in over the protocol (1001) on `conn`."""
    conn: Conn
    login_time: float
    inflight: dict = field(default_factory=dict)   # speechID -> monotonic time of its 3001
    answered: int = 0

    @property
    def key(self):
        return 'sttengine@%s' % self.conn.name


# ---------------------------------------------------------------- master

class Master:
    """The one selectors loop over the listening socket, every connection, every
    worker's pipe and exit sentinel, and the signal wake-up fd."""

    def __init__(self, cfg, listener, engine, ready_fd=None, cfg_path=None):
        self.cfg = cfg
        self.cfg_path = cfg_path
        self.listener = listener
        self.engine = engine
        self.ready_fd = ready_fd
        self.sel = selectors.DefaultSelector()
        self.conns = {}
        self.tasks = {}
        self.pending = collections.deque()
        self.workers = {}             # number -> WorkerSlot
        self.retired = []             # slots leaving after a reload
        self.heartbeats = MP.RawArray('d', HEARTBEAT_SLOTS)
        self.free_hb = list(range(HEARTBEAT_SLOTS - 1, -1, -1))
        self.respawn_at = {}          # number -> monotonic time
        self.respawn_delay = {}
        self.signals = []
        self.stopping = False
        self.stop_deadline = None
        self.running = True
        self.counters = collections.Counter()
        self.pid = os.getpid()
        self.reporter = None
        self.webhook = None
        self.db = None
        self.monitor = None
        self.scanner = _scanner.ScannerLink(self)
        self.notify_engine = self.scanner.engine_changed
        self.engines = {}             # Conn -> EngineConn (remote engine only)
        self.engine_queue = collections.deque()   # speechIDs prepared, waiting for a free engine
        self.recently_ended = collections.OrderedDict()   # speechID -> final state, to explain late 4001s
        self.seq_day, self.seq = None, 0
        # One descriptor held in reserve, given up to shed a connection when none are left (EMFILE).
        self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._apply_cfg()

    def _apply_cfg(self):
        c = self.cfg
        self.max_tasks = int(c['setting']['max_tasks'])
        self.timeout = float(c['setting']['session_timeout_secs'])
        self.graceful = float(c['setting']['graceful_timeout_secs'])
        self.heartbeat = float(c['setting']['heartbeat_secs'])
        self.max_conns = int(c['server']['max_connections'])
        self.max_body = int(c['server']['max_packet_bytes'])
        self.roots = [os.path.realpath(r) for r in c['directory']['allowed_roots']]
        self.allow = [ipaddress.ip_network(n, strict=False) for n in c['server']['allow']]
        self.n_workers = int(c['setting']['worker_processes'])
        self.engine_slots = int(c['engine']['engine_slots'])
        self.engine_concurrency = int(c['engine']['engine_concurrency'])

    # ------------------------------------------------------------ start-up

    def start(self):
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.sel.register(self.wake_r, selectors.EVENT_READ, (self._on_wake, None))
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, (self._on_accept, None))
        # Children before threads: forking a process that runs threads is unsafe.
        for n in range(1, self.n_workers + 1):
            self.spawn_worker(n)
        self.scanner.start()
        self.reporter = _records.Reporter(self.make_sinks())
        # Last sink: the scanner hears that a task ended only once every trace of it is made.
        self.reporter.sinks.append(self.scanner)
        self.reporter.start()
        self.monitor = Monitor(float(self.cfg['setting']['monitor_interval_secs']),
                               on_refresh=self.db.status_hook(self) if self.db else None)
        self.monitor.start()
        log.info('master: listening on %s:%s with %d worker(s), engine %s, max_tasks %d',
                 *self.listener.getsockname()[:2], self.n_workers, self.engine.name, self.max_tasks)
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b'ok\n')
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def make_sinks(self):
        sinks = [_records.RecordsFile(os.path.join(_config.base_dir(self.cfg), 'records'))]
        if self.cfg['webhook']['url']:
            # Its sender threads start here, after the children, and drain what an earlier run left.
            self.webhook = _webhook.WebhookSink(_webhook.Settings.from_cfg(self.cfg),
                                                _webhook.Outbox(_webhook.outbox_dir(self.cfg)))
            self.webhook.start()
            sinks.append(self.webhook)
        if self.cfg['db']['enabled']:
            # Its writer thread (and its connection, made inside it) starts here, after the children.
            self.db = _db.DatabaseSink(self.cfg, os.path.join(_config.base_dir(self.cfg), 'records'))
            sinks.append(self.db)
        return sinks

    def _on_signal(self, signum, frame):
        # Only note it; the loop acts (the wake-up fd has already been written).
        self.signals.append(signum)

    # ------------------------------------------------------------ workers

    def spawn_worker(self, number):
        hb = self.free_hb.pop()
        self.heartbeats[hb] = time.monotonic()
        parent_end, child_end = MP.Pipe(duplex=True)
        inherited = [key.fd for key in self.sel.get_map().values()]
        inherited += [self.wake_w.fileno(), parent_end.fileno()]
        if self.spare_fd is not None:
            inherited.append(self.spare_fd)
        proc = MP.Process(target=_worker.main, name='worker-%d' % number,
                          args=(number, hb, child_end, self.engine, self.cfg, self.heartbeats, self.pid, inherited))
        proc.start()
        child_end.close()
        slot = WorkerSlot(number, hb, proc, parent_end, time.monotonic())
        self.workers[number] = slot
        self.sel.register(parent_end.fileno(), selectors.EVENT_READ, (self._on_worker_msg, slot))
        self.sel.register(proc.sentinel, selectors.EVENT_READ, (self._on_worker_exit, slot))
        log.info('master: worker %d started with pid %d', number, proc.pid)
        return slot

    def _on_worker_msg(self, slot, mask):
        while slot.pipe_open:
            try:
                if not slot.conn.poll(0):
                    return
                msg = slot.conn.recv()
            except (EOFError, OSError):
                slot.pipe_open = False
                self._unregister(slot.conn.fileno())
                return
            kind, sid = msg[0], msg[1]
            task = self.tasks.get(sid)
            if task is None or task.worker != slot.number or slot.task != sid:
                log.warning('master: worker %d sent %s for speechID=%s, which it does not hold', slot.number, kind, sid)
                continue
            if kind == 'state':
                new = State(msg[2])
                if can_move(task.state, new) and new != task.state:
                    if task.state == State.INIT:
                        task.mark(Mark.WORKER_GET)
                    task.state = new
                    self.reporter.submit(_records.STATE, {'speechID': sid, 'state': new.value,
                                                          'worker': slot.number, 'at': time.time()})
            elif kind == 'done':
                slot.task = None
                slot.done += 1
                if msg[2].get('prepared'):
                    self.to_engine(task, msg[2])
                else:
                    self.end_task(task, msg[2])
                if slot.retiring:
                    self._retire(slot)

    def _on_worker_exit(self, slot, mask):
        # A result sent just before the exit may still sit in the pipe: read it first.
        if slot.pipe_open:
            self._on_worker_msg(slot, mask)
        slot.proc.join(0.5)
        code = slot.proc.exitcode
        self._unregister(slot.proc.sentinel)
        if slot.pipe_open:
            slot.pipe_open = False
            self._unregister(slot.conn.fileno())
        slot.conn.close()
        self.free_hb.append(slot.hb_index)
        why = 'signal %d' % -code if code is not None and code < 0 else 'exit status %s' % code
        if slot in self.retired:
            self.retired.remove(slot)
            log.info('master: retired worker %d (pid %d) ended with %s', slot.number, slot.proc.pid, why)
            return
        if self.workers.get(slot.number) is slot:
            del self.workers[slot.number]
        reason = slot.killed_reason or 'died with %s' % why
        level = logging.INFO if self.stopping and code == 0 else logging.ERROR
        log.log(level, 'master: worker %d (pid %d) %s', slot.number, slot.proc.pid, reason)
        if slot.task:
            task = self.tasks.get(slot.task)
            if task is not None:
                self._worker_lost(task, slot, reason)
        if self.stopping:
            return
        lived = time.monotonic() - slot.started
        delay = 0.0
        if lived < BOOT_GRACE_SECS and slot.task is None and not slot.killed_reason:
            delay = min(MAX_RESPAWN_DELAY_SECS, max(1.0, 2 * self.respawn_delay.get(slot.number, 0.5)))
            log.error('master: worker %d failed within %.1f s of starting; next try in %.0f s',
                      slot.number, lived, delay)
        self.respawn_delay[slot.number] = delay
        self.respawn_at[slot.number] = time.monotonic() + delay

    def _worker_lost(self, task, slot, reason):
        task.attempts += 1
        task.worker = None
        retries = int(self.cfg['task']['retry_on_worker_death'])
        if task.attempts <= retries and time.monotonic() < task.deadline:
            log.warning('master: speechID=%s: retrying on another worker (%s)', task.speech_id, reason)
            task.state = State.INIT
            self.pending.appendleft(task.speech_id)
        else:
            self.end_task(task, {'state': State.ERROR, 'result': Result.ERROR,
                                 'message': 'the worker processing this task %s' % reason})

    def _retire(self, slot):
        """Ask a worker to leave after its task (reload, stop)."""
        slot.retiring = True
        if slot.task is None and not slot.told_to_leave and slot.pipe_open:
            slot.told_to_leave = True
            try:
                slot.conn.send(None)
            except OSError:
                pass

    def kill_worker(self, slot, reason):
        slot.killed_reason = reason
        try:
            os.kill(slot.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def dispatch(self):
        idle = [s for s in self.workers.values() if s.task is None and not s.retiring and s.pipe_open]
        while idle and self.pending:
            sid = self.pending.popleft()
            task = self.tasks.get(sid)
            if task is None:
                continue
            slot = idle.pop()
            try:
                slot.conn.send(task.job)
            except OSError as exc:
                log.error('master: could not hand speechID=%s to worker %d: %s', sid, slot.number, exc)
                self.pending.appendleft(sid)
                continue
            slot.task, slot.task_since = sid, time.monotonic()
            task.worker = slot.number
            task.mark(Mark.WORKER_PUT)

    # ------------------------------------------------------------ connections

    def _on_accept(self, _, mask):
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed_one_connection(exc)
                else:
                    log.error('master: accept failed: %s', exc)
                return
            if self.allow and not self._allowed(addr[0]):
                log.warning('master: connection from %s refused: not in [server] allow', addr[0])
                sock.close()
                self.counters['refused'] += 1
                continue
            if len(self.conns) >= self.max_conns and not self._evict_idle():
                log.warning('master: connection from %s:%s refused: max_connections %d reached',
                            addr[0], addr[1], self.max_conns)
                sock.close()
                self.counters['refused'] += 1
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, addr, _packet.FrameDecoder(self.max_body))
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, (self._on_conn, conn))
            log.debug('master: connection from %s', conn.name)

    def _evict_idle(self):
        """At max_connections, make room by closing the connection that has held an
        incomplete frame longest, or one that never sent a whole frame: the shapes of
        slowloris, which would otherwise lock real clients out."""
        victims = [c for c in self.conns.values() if c.engine is None and not c.tasks
                   and (c.partial_since is not None or c.frames == 0)]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c.partial_since if c.partial_since is not None else c.opened)
        log.warning('master: max_connections %d reached: closing %s, which %s', self.max_conns, victim.name,
                    'holds an incomplete frame' if victim.partial_since is not None else 'never sent a frame')
        self.counters['evicted'] += 1
        self.close_conn(victim)
        return True

    def _shed_one_connection(self, exc):
        """Out of file descriptors: the pending connection would keep the listener readable
        and the loop spinning. Accept it on a spare descriptor and close it at once."""
        log.error('master: accept failed: %s; refusing one connection', exc)
        self.counters['refused'] += 1
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        try:
            sock, _ = self.listener.accept()
            sock.close()
        except OSError:
            pass
        try:
            self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.spare_fd = None

    def _allowed(self, host):
        try:
            ip = ipaddress.ip_address(host.split('%')[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def _on_conn(self, conn, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read(conn)

    def _read(self, conn):
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info('master: %s: receive failed: %s', conn.name, exc)
            self.close_conn(conn)
            return
        if not data:
            if conn.decoder.pending:
                log.warning('master: %s closed the connection inside a frame (%d bytes held)',
                            conn.name, conn.decoder.buffered)
            self.close_conn(conn)
            return
        if conn.closing:
            return
        try:
            frames = conn.decoder.feed(data)
        except ProtocolError as exc:
            # Whole frames that arrived before the bad header are still answered.
            for ptype, body in exc.frames:
                self.handle_frame(conn, ptype, body)
            self.framing_error(conn, exc)
            return
        conn.partial_since = (conn.partial_since or time.monotonic()) if conn.decoder.pending else None
        conn.frames += len(frames)
        for ptype, body in frames:
            if conn.closing:
                break
            self.handle_frame(conn, ptype, body)

    def framing_error(self, conn, exc):
        log.warning('master: %s: framing error: %s; closing', conn.name, exc)
        self.counters['framing_errors'] += 1
        if exc.ptype is not None and 1000 <= exc.ptype < 2000:
            body = _packet.error_body(None, Result.BAD_REQUEST, State.NONE, 'framing error: %s' % exc)
            self.send(conn, exc.ptype + 1000, body)
        self.close_conn(conn, after_flush=True)

    def send(self, conn, ptype, body):
        if conn.closed:
            return False
        conn.wbuf += _packet.encode(ptype, body)
        if len(conn.wbuf) > MAX_SEND_BUFFER:
            log.warning('master: %s does not read its answers (%d bytes waiting); closing', conn.name, len(conn.wbuf))
            self.close_conn(conn)
            return False
        self._flush(conn)
        return True

    def _flush(self, conn):
        while conn.wbuf and not conn.closed:
            try:
                n = conn.sock.send(conn.wbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info('master: %s: send failed: %s', conn.name, exc)
                self.close_conn(conn)
                return
            del conn.wbuf[:n]
        if conn.closed:
            return
        if not conn.wbuf and conn.closing:
            self.close_conn(conn)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wbuf else 0)
        key = self.sel.get_key(conn.sock)
        if key.events != events:
            self.sel.modify(conn.sock, events, key.data)

    def close_conn(self, conn, after_flush=False):
        if conn.closed:
            return
        if after_flush and conn.wbuf:
            conn.closing = True
            return
        conn.closed = True
        self._unregister(conn.sock)
        self.conns.pop(conn.sock.fileno(), None)
        try:
            conn.sock.close()
        except OSError:
            pass
        if conn.engine is not None:
            self.engine_lost(conn.engine)
        if conn.tasks:
            log.info('master: %s left with %d task(s) in progress; they finish and are recorded with result 8',
                     conn.name, len(conn.tasks))

    def _unregister(self, fileobj):
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # ------------------------------------------------------------ requests

    def handle_frame(self, conn, ptype, body):
        if ptype == Type.TRANSCRIBE:
            self.on_transcribe(conn, body)
        elif ptype == Type.MONITOR:
            self.on_monitor(conn, body)
        elif ptype == Type.LOGIN:
            self.on_login(conn, body)
        elif ptype == Type.RECOGNIZE_RESP and conn.engine is not None:
            self.on_recognized(conn, body)
        elif 1000 <= ptype < 2000:
            log.warning('master: %s: unsupported packet type %d', conn.name, ptype)
            self.send(conn, ptype + 1000, {'result': str(Result.UNSUPPORTED),
                                           'message': 'unsupported packet type %d' % ptype})
        else:
            log.warning('master: %s: unexpected packet type %d (%d bytes) ignored', conn.name, ptype, len(body))

    # ------------------------------------------------------------ remote engines

    def on_login(self, conn, body):
        name = body.decode('utf-8', 'replace').strip().strip('\x00')
        if self.engine.embedded:
            code = Result.UNSUPPORTED
            why = 'this node runs the embedded %s engine' % self.engine.name
        elif name != 'sttengine':
            code, why = Result.UNSUPPORTED, 'unknown engine name'
        elif conn.engine is not None or len(self.engines) >= self.engine_slots:
            code, why = Result.ALREADY_CONNECTED, 'all %d engine slot(s) are taken' % self.engine_slots
        else:
            code, why = Result.OK, None
        if code != Result.OK:
            log.warning('master: %s: engine login %r refused with %s: %s', conn.name, name[:64], code.value, why)
            self.send(conn, Type.LOGIN_RESP, code.value)
            return
        conn.engine = EngineConn(conn, time.time())
        self.engines[conn] = conn.engine
        log.info('master: engine %s logged in (%d of %d slot(s))', conn.name, len(self.engines), self.engine_slots)
        self.send(conn, Type.LOGIN_RESP, Result.OK.value)
        self.engine_changed()
        self.dispatch_engine()

    def engine_changed(self):
        """Tell whoever cares that engine availability may have changed (hook for the scanner)."""
        notify = getattr(self, 'notify_engine', None)
        if notify:
            notify(self.engine_available())

    def next_seq(self):
        """The per-day task counter sent as seq in 3001 when no database gives a row id."""
        day = time.strftime('%Y%m%d')
        if day != self.seq_day:
            self.seq_day = day
            self.seq = last_seq(os.path.join(_config.base_dir(self.cfg), 'records'), day)
        self.seq += 1
        return self.seq

    def assign_seq(self, task):
        """A task's number (3001 seq, records, webhook): its database row id when the
        database has written the row, else the per-day counter."""
        if task.seq is None:
            task.seq = (self.db.row_id(task.speech_id) if self.db else None) or self.next_seq()

    def to_engine(self, task, prepared):
        """A worker prepared the audio of a remote-engine task: queue its 3001."""
        task.prepared = prepared
        task.mark(Mark.WORKER_DONE)
        if not self.engines:
            self.end_task(task, {'state': State.ERROR, 'result': Result.UNAVAILABLE,
                                 'message': 'no engine is logged in'})
            return
        if task.state != State.RECOGNIZE:
            task.state = State.RECOGNIZE
            self.reporter.submit(_records.STATE, {'speechID': task.speech_id, 'state': task.state.value,
                                                  'worker': task.worker, 'at': time.time()})
        self.engine_queue.append(task.speech_id)
        self.dispatch_engine()

    def dispatch_engine(self):
        while self.engine_queue:
            free = [e for e in self.engines.values() if len(e.inflight) < self.engine_concurrency]
            if not free:
                return
            eng = min(free, key=lambda e: (len(e.inflight), e.login_time))
            task = self.tasks.get(self.engine_queue.popleft())
            if task is None:
                continue
            self.assign_seq(task)
            body = {k: v for k, v in task.request.items() if k != 'keepSource'}
            s = self.cfg['server']
            body.update({
                'seq': task.seq, 'serverSeq': int(s['server_seq']), 'domainSeq': int(s['domain_seq']),
                'imageSeq': int(s['image_seq']), 'audioPath': task.job['audioPath'],
                'audioWAV': task.prepared.get('audioWAV') or '', 'audioMP3': task.prepared.get('audioMP3') or '',
                'channels': task.prepared.get('channels', 1),
            })
            eng.inflight[task.speech_id] = time.monotonic()
            task.engine = eng
            task.mark(Mark.STT_SEND)
            self.send(eng.conn, Type.RECOGNIZE, body)

    def on_recognized(self, conn, body):
        eng = conn.engine
        try:
            msg = _packet.decode_json(Type.RECOGNIZE_RESP, body)
        except RequestError as exc:
            log.warning('master: engine %s sent a bad 4001 (%s); dropped', conn.name, exc.message)
            return
        sid = msg.get('speechID')
        if not isinstance(sid, str) or sid not in eng.inflight:
            if isinstance(sid, str) and sid in self.recently_ended:
                log.warning('master: late 4001 from %s for speechID=%s (the task already ended %s); dropped',
                            conn.name, sid, self.recently_ended[sid])
            else:
                log.warning('master: 4001 from %s for unknown speechID=%r; dropped', conn.name, sid)
            self.counters['engine_dropped'] += 1
            return
        del eng.inflight[sid]
        eng.answered += 1
        task = self.tasks[sid]
        task.engine = None
        task.mark(Mark.STT_RECV)
        result = str(msg.get('result', Result.ERROR.value))
        if result not in Result._value2member_map_:
            log.warning('master: engine %s answered speechID=%s with unknown result %r; using 9', conn.name, sid, result)
            result = Result.ERROR.value
        transcript = msg.get('transcript', msg.get('transcipt', ''))
        outcome = dict(task.prepared or {})
        outcome.pop('prepared', None)
        outcome.pop('channels', None)
        outcome.update({'result': result, 'transcript': transcript if isinstance(transcript, str) else '',
                        'state': State.DONE if result == Result.OK.value else State.ERROR})
        if result != Result.OK.value:
            outcome['message'] = msg.get('message') or 'the engine answered with result %s' % result
        self.end_task(task, outcome)
        self.dispatch_engine()

    def engine_lost(self, eng):
        """An engine connection closed: its unanswered tasks go to another engine, or end with 3."""
        self.engines.pop(eng.conn, None)
        orphans = [sid for sid in eng.inflight if sid in self.tasks]
        eng.inflight.clear()
        log.warning('master: engine %s disconnected with %d task(s) in flight; %d engine(s) left',
                    eng.conn.name, len(orphans), len(self.engines))
        for sid in orphans:
            self.tasks[sid].engine = None
        if self.engines:
            self.engine_queue.extendleft(reversed(orphans))
            self.dispatch_engine()
        else:
            for sid in orphans + list(self.engine_queue):
                task = self.tasks.get(sid)
                if task is not None:
                    self.end_task(task, {'state': State.ERROR, 'result': Result.UNAVAILABLE,
                                         'message': 'the engine disconnected and no other engine is logged in'})
            self.engine_queue.clear()
        self.engine_changed()

    def reject(self, conn, req, result, message, level=logging.WARNING):
        sid = req.get('speechID') if isinstance(req, dict) else None
        log.log(level, 'master: %s speechID=%s: rejected with %s: %s', conn.name, sid, result.value, message)
        self.counters['rejected'] += 1
        self.send(conn, Type.TRANSCRIBE_RESP, _packet.error_body(req, result, State.NONE, message))

    def on_transcribe(self, conn, body):
        try:
            req = _packet.check_transcribe(_packet.decode_json(Type.TRANSCRIBE, body))
        except RequestError as exc:
            req = None
            try:
                req = json.loads(body.decode('utf-8'))
            except (UnicodeDecodeError, ValueError):
                pass
            self.reject(conn, req if isinstance(req, dict) else None, Result.BAD_REQUEST, exc.message)
            return
        outcome = self.admit(req, Source.CLIENT, conn)
        if outcome is not None:
            self.reject(conn, req, *outcome)

    def admit(self, req, source, conn=None):
        """Make a task of a checked request, or return (result, message) why not."""
        if self.stopping:
            return Result.UNAVAILABLE, 'the service manager is shutting down'
        sid = req.get('speechID')
        if sid is None:
            sid = req['speechID'] = _packet.new_speech_id()
        if sid in self.tasks:
            return Result.ALREADY_CONNECTED, 'speechID %s is already in progress' % sid
        if not self.engine_available():
            return Result.UNAVAILABLE, 'no engine is available'
        if len(self.tasks) >= self.max_tasks:
            return Result.TOO_MANY, 'max_tasks (%d) tasks are already queued or running' % self.max_tasks
        try:
            job = self.make_job(req)
        except RequestError as exc:
            return Result.BAD_REQUEST, exc.message
        now, mono = time.time(), time.monotonic()
        task = Task(sid, req, source, conn, now, mono, mono + self.timeout, job,
                    socket_fd=conn.sock.fileno() if conn else None)
        task.mark(Mark.TRANSCRIBE_START, mono)
        self.tasks[sid] = task
        if conn is not None:
            conn.tasks.add(sid)
        self.pending.append(sid)
        self.counters['accepted'] += 1
        self.reporter.submit(_records.ACCEPTED, {
            'speechID': sid, 'source': source.value, 'state': task.state.value,
            'startTime': _records.stamp(task.created), 'created': task.created,
            'request': {k: v for k, v in req.items() if k != 'speechID'}, 'audioPath': job['audioPath']})
        log.info('master: speechID=%s accepted from %s (%s)', sid, conn.name if conn else source, job['candidates'][0])
        return None

    def engine_available(self):
        if not self.engine.embedded:
            return bool(self.engines)
        return bool(self.workers) or bool(self.respawn_at)

    def inside_roots(self, path):
        return _worker.inside(os.path.realpath(path), self.roots)

    def make_job(self, req):
        """The worker's job for a request; paths are checked against the roots here."""
        base = req['filePath']
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
        return {
            'speechID': req['speechID'], 'candidates': candidates, 'roots': self.roots,
            'audioPath': os.path.normpath(audio_path), 'stem': req['speechID'],
            'mp3_backup': bool(t['mp3_backup']), 'keep_wav': bool(t['keep_wav']),
            'source_after': t['source_after'], 'keep_source': bool(req.get('keepSource')),
            'error_backup_path': t['error_backup_path'],
        }

    # ------------------------------------------------------------ ending tasks

    def end_task(self, task, outcome):
        if self.tasks.pop(task.speech_id, None) is None:
            return
        try:
            self.pending.remove(task.speech_id)
        except ValueError:
            pass
        if task.worker is not None:
            slot = self.workers.get(task.worker)
            if slot is not None and slot.task == task.speech_id:
                slot.task = None
        if task.engine is not None:
            task.engine.inflight.pop(task.speech_id, None)
        if outcome is None:
            # A scanned file's task cut short by a stop: no answer, no record. The file stays
            # in .processing and the next start submits it again under the same speechID.
            log.info('master: speechID=%s left claimed for the next start', task.speech_id)
            return
        self.assign_seq(task)
        state = State(str(outcome.get('state', State.ERROR)))
        self.recently_ended[task.speech_id] = state.value
        if len(self.recently_ended) > 10000:
            self.recently_ended.popitem(last=False)
        result = Result(str(outcome.get('result', Result.ERROR)))
        task.state = state
        task.mark(Mark.TRANSCRIBE_END)
        conn = task.conn
        if conn is not None:
            conn.tasks.discard(task.speech_id)
        if conn is not None and not conn.closed:
            self.send(conn, Type.TRANSCRIBE_RESP, self.response(task, outcome, state, result))
        elif task.source == Source.CLIENT:
            result = Result.DISCONNECTED
        self.counters['result_' + result.value] += 1
        level = logging.INFO if result == Result.OK else logging.WARNING
        log.log(level, 'master: speechID=%s ended %s/%s%s', task.speech_id, state.value, result.value,
                ': ' + outcome['message'] if outcome.get('message') else '')
        self.reporter.submit(_records.FINAL, self.record(task, outcome, state, result))

    def response(self, task, outcome, state, result):
        if result == Result.OK:
            body = {'result': result.value, 'state': state.value, 'speechID': task.speech_id}
            for key in ('transcript', 'channels', 'duration', 'audioWAV', 'audioMP3'):
                if key in outcome:
                    body[key] = outcome[key]
            body['transcipt'] = body.get('transcript', '')
            return body
        body = _packet.error_body(task.request, result, state, outcome.get('message', ''))
        return body

    def record(self, task, outcome, state, result):
        data = {'speechID': task.speech_id, 'transcript': outcome.get('transcript', ''), 'result': result.value}
        rec = {
            'data': data,
            'socket': task.socket_fd,
            'state': state.value,
            'startTime': _records.stamp(task.created),
            'endTime': _records.stamp(),
            'processInterval': task.marks,
            'source': task.source.value,
            'worker': task.worker,
            'duration': outcome.get('duration'),
            'request': {k: v for k, v in task.request.items() if k != 'speechID'},
        }
        for key in ('message', 'channels', 'audioWAV', 'audioMP3'):
            if outcome.get(key) is not None:
                rec[key] = outcome[key]
        if task.seq is not None:
            rec['seq'] = task.seq
        if result == Result.DISCONNECTED:
            rec['engineResult'] = str(outcome.get('result', ''))
        return rec

    # ------------------------------------------------------------ monitor

    MONITOR_PARTS = ('engine', 'task', 'cpu', 'memory', 'disk')

    def on_monitor(self, conn, body):
        try:
            req = _packet.decode_json(Type.MONITOR, body)
        except RequestError as exc:
            self.send(conn, Type.MONITOR_RESP, _packet.error_body(None, Result.BAD_REQUEST, State.NONE, exc.message))
            return
        kind = req.get('type', 'all')
        if kind != 'all' and kind not in self.MONITOR_PARTS:
            self.send(conn, Type.MONITOR_RESP, _packet.error_body(
                req, Result.BAD_REQUEST, State.NONE,
                'type must be one of all, %s' % ', '.join(self.MONITOR_PARTS)))
            return
        self.send(conn, Type.MONITOR_RESP, self.monitor_body(kind))

    def monitor_body(self, kind='all'):
        snap = self.monitor.snapshot
        body = {'version': self.cfg['setting']['version']}
        if kind in ('all', 'engine'):
            body['engine'] = {'sttengine': self.engine_available()}
            if self.engine.embedded:
                body['engine'][self.engine.name] = self.engine.describe()
            for eng in self.engines.values():
                body['engine'][eng.key] = {'address': eng.conn.name, 'loginTime': _records.stamp(eng.login_time),
                                           'inflight': len(eng.inflight), 'answered': eng.answered}
        if kind in ('all', 'task'):
            body['task'] = [{'speechID': t.speech_id, 'startTime': _records.stamp(t.created), 'state': t.state.value}
                            for t in self.tasks.values()]
        for part in ('disk', 'cpu', 'memory'):
            if kind in ('all', part):
                body[part] = snap[part]
        if kind == 'all':
            now = time.monotonic()
            body['workers'] = [{'worker': s.number, 'pid': s.proc.pid, 'speechID': s.task,
                                'busySecs': round(now - s.task_since, 3) if s.task else None, 'done': s.done}
                               for s in sorted(self.workers.values(), key=lambda s: s.number)]
            body['queue'] = {'pending': len(self.pending), 'running': len(self.tasks) - len(self.pending),
                             'maxTasks': self.max_tasks, 'records': self.reporter.depth()}
            body['counters'] = dict(self.counters)
            body['outbox'] = self.webhook.status() if self.webhook else {'enabled': False}
            body['db'] = self.db.stats() if self.db else {'enabled': False}
            body['scanner'] = self.scanner.describe()
        return body

    # ------------------------------------------------------------ timers

    def tick(self):
        now = time.monotonic()
        for task in [t for t in self.tasks.values() if now >= t.deadline]:
            slot = self.workers.get(task.worker) if task.worker is not None else None
            if slot is not None and slot.task == task.speech_id:
                log.error('master: worker %d stuck on speechID=%s past its deadline; killing it',
                          slot.number, task.speech_id)
                self.kill_worker(slot, 'was killed: stuck past the task deadline')
            self.end_task(task, {'state': State.TIMEOUT, 'result': Result.TIMEOUT,
                                 'message': 'the task did not finish within session_timeout_secs (%g s)' % self.timeout})
        for conn in list(self.conns.values()):
            if conn.partial_since is not None and now - conn.partial_since > self.timeout:
                log.warning('master: %s held an incomplete frame (%d bytes) for over %g s; closing',
                            conn.name, conn.decoder.buffered, self.timeout)
                self.close_conn(conn)
        stale = max(10.0, 5 * self.heartbeat)
        for slot in list(self.workers.values()):
            if slot.task is None and not slot.killed_reason and now - self.heartbeats[slot.hb_index] > stale \
                    and now - slot.started > stale:
                log.error('master: worker %d sent no heartbeat for %.0f s while idle; killing it',
                          slot.number, now - self.heartbeats[slot.hb_index])
                self.kill_worker(slot, 'was killed: heartbeat stale')
        if not self.stopping:
            for number, at in list(self.respawn_at.items()):
                if now >= at and number not in self.workers and number <= self.n_workers:
                    del self.respawn_at[number]
                    self.spawn_worker(number)
                elif number > self.n_workers:
                    del self.respawn_at[number]
        self.scanner.tick(now)

    # ------------------------------------------------------------ signals

    def _on_wake(self, _, mask):
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def handle_signals(self):
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(signal.Signals(sig).name)
            elif sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGUSR1:
                _config.reopen_logs()
                for slot in self.workers.values():
                    _signal_pid(slot.proc.pid, signal.SIGUSR1)
                self.scanner.signal(signal.SIGUSR1)
                log.info('master: log files reopened')

    def reload(self):
        path = self.cfg_path or self.cfg.filename
        try:
            cfg = _config.load(path)
        except _config.ConfigError as exc:
            for line in exc.problems:
                log.error('master: reload refused: %s', line)
            return
        log.info('master: reloading %s', path)
        old_listen = (self.cfg['server']['ip'], int(self.cfg['server']['port']))
        old_engine = dict(self.cfg['engine'])
        self.cfg = cfg
        self._apply_cfg()
        _config.setup_logging(cfg, 'master')
        new_listen = (cfg['server']['ip'], int(cfg['server']['port']))
        if new_listen != old_listen:
            try:
                listener = make_listener(*new_listen)
            except OSError as exc:
                log.error('master: cannot listen on %s:%s (%s); keeping %s:%s', *new_listen, exc, *old_listen)
            else:
                self._unregister(self.listener)
                self.listener.close()
                self.listener = listener
                listener.setblocking(False)
                self.sel.register(listener, selectors.EVENT_READ, (self._on_accept, None))
        if dict(cfg['engine']) != old_engine:
            engine = _engine.make_engine(cfg)
            try:
                engine.load()
            except _engine.EngineError as exc:
                log.error('master: new engine could not be loaded (%s); keeping %s', exc, self.engine.name)
            else:
                self.engine = engine
        # Workers restart gracefully: the old ones finish their task, new ones take new jobs.
        old = list(self.workers.values())
        self.workers = {}
        self.respawn_at.clear()
        for slot in old:
            self.retired.append(slot)
            self._retire(slot)
        for n in range(1, self.n_workers + 1):
            self.spawn_worker(n)
        self.scanner.reload()
        log.info('master: reload done: %d worker(s)', self.n_workers)

    def begin_stop(self, why):
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.graceful
        log.info('master: %s received: stopping (graceful timeout %g s, %d task(s) in progress)',
                 why, self.graceful, len(self.tasks))
        self._unregister(self.listener)
        self.listener.close()
        self.scanner.stop()
        for sid in list(self.pending):
            task = self.tasks.get(sid)
            if task is not None:
                self.end_task(task, None if task.source == Source.SCANNER else {
                    'state': State.ERROR, 'result': Result.UNAVAILABLE,
                    'message': 'the service manager is shutting down'})
        self.pending.clear()
        for slot in list(self.workers.values()):
            self._retire(slot)

    def stop_progress(self):
        """During a stop: end what the graceful timeout did not let finish, and leave once all is out."""
        now = time.monotonic()
        if now >= self.stop_deadline and self.tasks:
            log.warning('master: graceful timeout: ending %d running task(s) with result 3', len(self.tasks))
            for task in list(self.tasks.values()):
                self.end_task(task, None if task.source == Source.SCANNER else {
                    'state': State.ERROR, 'result': Result.UNAVAILABLE,
                    'message': 'the service manager stopped before the task finished'})
        if not self.tasks:
            # Tasks ended by the deadline left their workers busy in our books only: release them too.
            for slot in list(self.workers.values()) + self.retired:
                self._retire(slot)
        if now >= self.stop_deadline + 5:
            for slot in list(self.workers.values()) + self.retired:
                if slot.proc.is_alive():
                    self.kill_worker(slot, 'was killed: did not stop in time')
            self.scanner.kill()
        if not self.tasks and not self.workers and not self.retired and self.scanner.gone:
            self.running = False

    # ------------------------------------------------------------ loop

    def serve(self):
        self.start()
        next_tick = 0.0
        while self.running:
            now = time.monotonic()
            timeout = max(0.0, min(next_tick - now, TICK_SECS))
            for key, mask in self.sel.select(timeout):
                handler, obj = key.data
                try:
                    handler(obj, mask)
                except Exception:  # the loop's one catch-all: one bad event must not stop the service
                    log.error('master: error handling an event of %r', obj, exc_info=True)
                    if isinstance(obj, Conn):
                        self.close_conn(obj)
            self.handle_signals()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_SECS
                self.tick()
            if not self.stopping:
                self.dispatch()
            else:
                self.stop_progress()
        self.finish()

    def finish(self):
        deadline = time.monotonic() + 2
        while any(c.wbuf for c in self.conns.values()) and time.monotonic() < deadline:
            for key, mask in self.sel.select(0.05):
                handler, obj = key.data
                if isinstance(obj, Conn):
                    self._flush(obj)
        for conn in list(self.conns.values()):
            self.close_conn(conn)
        self.monitor.stop()
        self.reporter.stop()
        log.info('master: stopped (%d records written)', self.reporter.written)


def last_seq(folder, day):
    """The highest seq recorded on `day`, so the per-day counter goes on after a restart."""
    best = 0
    try:
        with open(os.path.join(folder, day + '.json'), encoding='utf-8') as f:
            for line in f:
                if '"seq"' in line:
                    try:
                        best = max(best, int(json.loads(line).get('seq') or 0))
                    except (ValueError, TypeError, AttributeError):
                        continue
    except OSError:
        pass
    return best


def _signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- daemon plumbing

def make_listener(ip, port):
    family = socket.AF_INET6 if ':' in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(512)
    return sock


def banner_start(fh, pid):
    fh.write('================[ Program Start ]============================= %s\n'
             % time.strftime('%Y.%m.%d %H:%M:%S'))
    fh.write('Service Manager Daemon started with pid %d\n' % pid)
    fh.flush()


def banner_end(fh):
    fh.write('================[ Program End ]=============================== %s\n'
             % time.strftime('%Y.%m.%d %H:%M:%S'))
    fh.flush()


def read_pid(cfg):
    """The pid of the running daemon, or None; a stale pidfile is removed."""
    path = cfg['setting']['pidfile']
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and is_master(pid):
        return pid
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return None


def is_master(pid):
    import psutil
    try:
        title = _children.title_of(psutil.Process(pid))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return title.startswith('svcmgr: master')


def prepare_master(cfg, cfg_path):
    """Everything that can fail before forking: folders, the port, the engine."""
    for key in ('audio_source_path', 'audio_target_path'):
        os.makedirs(cfg['directory'][key], exist_ok=True)
    os.makedirs(cfg['task']['error_backup_path'], exist_ok=True)
    os.makedirs(os.path.join(_config.base_dir(cfg), 'records'), exist_ok=True)
    os.makedirs(cfg['setting']['log_path'], exist_ok=True)
    listener = make_listener(cfg['server']['ip'], int(cfg['server']['port']))
    engine = _engine.make_engine(cfg)
    engine.load()
    return listener, engine


def run_master(cfg, cfg_path, listener, engine, ready_fd=None, psout=None):
    _children.set_title('svcmgr: master %s' % cfg_path)
    _config.setup_logging(cfg, 'master')
    if psout is not None:
        banner_start(psout, os.getpid())
    log.info('================ Service Manager %s started with pid %d', cfg['setting']['version'], os.getpid())
    master = Master(cfg, listener, engine, ready_fd=ready_fd, cfg_path=cfg_path)
    try:
        master.serve()
    finally:
        if psout is not None:
            banner_end(psout)
        logging.shutdown()


def cmd_start(cfg, cfg_path, foreground=False):
    pid = read_pid(cfg)
    if pid:
        print('svcmgr is already running with pid %d' % pid)
        return 1
    try:
        listener, engine = prepare_master(cfg, cfg_path)
    except OSError as exc:
        print('svcmgr: cannot listen on %s:%s: %s' % (cfg['server']['ip'], cfg['server']['port'], exc.strerror),
              file=sys.stderr)
        return 1
    except _engine.EngineError as exc:
        print('svcmgr: %s' % exc, file=sys.stderr)
        return 1
    psout_path = cfg['setting']['psout']
    pidfile_path = cfg['setting']['pidfile']
    if foreground:
        psout = open(psout_path, 'a', encoding='utf-8')
        with open(pidfile_path, 'w') as f:
            f.write('%d\n' % os.getpid())
        try:
            run_master(cfg, cfg_path, listener, engine, psout=psout)
        finally:
            _remove_pidfile(pidfile_path, os.getpid())
        return 0
    return daemonize(cfg, cfg_path, listener, engine, psout_path, pidfile_path)


def daemonize(cfg, cfg_path, listener, engine, psout_path, pidfile_path):
    """Fork the daemon with python-daemon and wait until it says it is ready."""
    import daemon
    import daemon.pidfile
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first:
        os.close(ready_w)
        listener.close()
        os.waitpid(first, 0)
        got = b''
        deadline = time.time() + 120
        while time.time() < deadline:
            import select
            r, _, _ = select.select([ready_r], [], [], 1)
            if r:
                chunk = os.read(ready_r, 64)
                got += chunk
                if not chunk or b'\n' in got:
                    break
        os.close(ready_r)
        if got.startswith(b'ok'):
            print('svcmgr started with pid %s' % (read_pid(cfg) or '?'))
            return 0
        print('svcmgr failed to start; see %s' % psout_path, file=sys.stderr)
        return 1
    os.close(ready_r)
    psout = open(psout_path, 'a', encoding='utf-8', buffering=1)
    context = daemon.DaemonContext(
        working_directory=_config.base_dir(cfg),
        umask=0o022,
        pidfile=daemon.pidfile.TimeoutPIDLockFile(pidfile_path, acquire_timeout=0),
        stdout=psout, stderr=psout,
        files_preserve=[listener, ready_w],
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    code = 0
    try:
        with context:
            run_master(cfg, cfg_path, listener, engine, ready_fd=ready_w, psout=psout)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc(file=psout)
        code = 1
    os._exit(code)


def _remove_pidfile(path, pid):
    try:
        with open(path) as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass


def cmd_stop(cfg, quiet=False):
    import psutil
    pid = read_pid(cfg)
    if not pid:
        if not quiet:
            print('svcmgr is not running')
        return 0 if quiet else 1
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    os.kill(pid, signal.SIGTERM)
    wait = float(cfg['setting']['graceful_timeout_secs']) + 30
    gone, alive = psutil.wait_procs(procs, timeout=wait)
    if alive:
        print('svcmgr: %d process(es) still running after %.0f s; killing them' % (len(alive), wait),
              file=sys.stderr)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
    print('svcmgr stopped (pid %d)' % pid)
    return 0


def cmd_status(cfg):
    import psutil
    pid = read_pid(cfg)
    if not pid:
        print('svcmgr is not running')
        return 3
    master = psutil.Process(pid)
    print('%-8s %-8s %s' % ('PID', 'ROLE', 'TITLE'))
    print('%-8d %-8s %s' % (pid, 'master', _children.title_of(master)))
    for child in master.children(recursive=True):
        try:
            title = _children.title_of(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        role = title.split()[1] if title.startswith('svcmgr: ') else 'other'
        print('%-8d %-8s %s' % (child.pid, role, title))
    return 0


def cmd_reload(cfg, cfg_path):
    pid = read_pid(cfg)
    if not pid:
        print('svcmgr is not running')
        return 1
    os.kill(pid, signal.SIGHUP)
    print('svcmgr (pid %d) told to reload %s' % (pid, cfg_path))
    return 0


# ---------------------------------------------------------------- client commands

def client_exchange(cfg, frames, expect, timeout):
    """Send frames to the running daemon and return `expect` answers (type, dict)."""
    host = cfg['server']['ip']
    if host in ('0.0.0.0', '::'):
        host = '127.0.0.1'
    sock = socket.create_connection((host, int(cfg['server']['port'])), timeout=10)
    sock.settimeout(timeout)
    for ptype, body in frames:
        sock.sendall(_packet.encode(ptype, body))
    decoder = _packet.FrameDecoder(64 << 20)
    answers = []
    while len(answers) < expect:
        data = sock.recv(1 << 16)
        if not data:
            break
        for ptype, body in decoder.feed(data):
            answers.append((ptype, json.loads(body.decode('utf-8'))))
    sock.close()
    return answers


def cmd_transcribe(cfg, files, keep):
    frames = []
    for path in files:
        path = os.path.abspath(path)
        req = {'speechID': _packet.new_speech_id(), 'filePath': os.path.dirname(path),
               'fileID': os.path.basename(path), 'fileName': os.path.basename(path)}
        if keep:
            req['keepSource'] = True
        frames.append((Type.TRANSCRIBE, req))
    timeout = float(cfg['setting']['session_timeout_secs']) + 30
    try:
        answers = client_exchange(cfg, frames, len(frames), timeout)
    except OSError as exc:
        print('svcmgr: cannot reach the daemon at %s:%s: %s' % (cfg['server']['ip'], cfg['server']['port'], exc),
              file=sys.stderr)
        return 1
    names = {req['speechID']: os.path.join(req['filePath'], req['fileID']) for _, req in frames}
    worst = 0
    for _, body in answers:
        name = names.get(body.get('speechID'), body.get('speechID'))
        if body.get('result') == '0':
            print('%s\t%s' % (name, body.get('transcript', '').replace('\n', '\n\t')))
        else:
            worst = 1
            print('%s\tERROR %s %s: %s' % (name, body.get('result'), body.get('state'), body.get('message')))
    if len(answers) < len(frames):
        print('svcmgr: the daemon answered %d of %d requests' % (len(answers), len(frames)), file=sys.stderr)
        worst = 1
    return worst


def cmd_monitor(cfg, kind):
    try:
        answers = client_exchange(cfg, [(Type.MONITOR, {'type': kind})], 1, 10)
    except OSError as exc:
        print('svcmgr: cannot reach the daemon: %s' % exc, file=sys.stderr)
        return 1
    if not answers:
        return 1
    print(json.dumps(answers[0][1], indent=2, ensure_ascii=False))
    return 0


def fallback_cfg(cfg_path):
    """Just enough of an invalid app.ini for stop and status: the pidfile and the stop wait."""
    import configobj
    folder = os.path.dirname(cfg_path)
    pidfile = 'svcmgr.pid'
    try:
        raw = configobj.ConfigObj(cfg_path, interpolation=False, encoding='utf-8')
        pidfile = raw.get('setting', {}).get('pidfile') or pidfile
    except (configobj.ConfigObjError, OSError, UnicodeDecodeError):
        pass
    return {'setting': {'pidfile': os.path.join(folder, os.path.expanduser(str(pidfile))),
                        'graceful_timeout_secs': 30}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog='svcmgr.py', description='svcmgr, the Service Manager for batch STT')
    parser.add_argument('-c', '--config', default=DEFAULT_INI, help='app.ini to use (default: beside svcmgr.py)')
    sub = parser.add_subparsers(dest='command', required=True)
    for name, text in (('start', 'start the daemon'), ('stop', 'stop the daemon gracefully'),
                       ('restart', 'stop, then start'), ('status', 'show the master and its children'),
                       ('reload', 'reload app.ini (SIGHUP)'), ('run', 'run in the foreground (systemd)')):
        sub.add_parser(name, help=text)
    p = sub.add_parser('transcribe', help='send files to the running daemon and print the transcripts')
    p.add_argument('files', nargs='+')
    p.add_argument('--keep', action='store_true', help='keep the source files (default: as app.ini says)')
    p = sub.add_parser('monitor', help='print the Monitor answer')
    p.add_argument('--type', default='all', choices=('all',) + Master.MONITOR_PARTS)
    p = sub.add_parser('webhook', help='the webhook outbox (works on its files, running or not)')
    wsub = p.add_subparsers(dest='webhook_command', required=True)
    w = wsub.add_parser('list', help='pending and failed deliveries with attempts and last error')
    w.add_argument('--json', action='store_true', help='print JSON')
    w = wsub.add_parser('redeliver', help='put failed deliveries back into the outbox, attempts reset')
    w.add_argument('speech_ids', nargs='*', metavar='speechID')
    w.add_argument('--all-failed', action='store_true', help='every entry in records/webhook/failed/')
    p = sub.add_parser('db', help='the MySQL database of [db]: init applies schema.sql, check verifies it')
    p.add_argument('db_command', choices=('init', 'check'))
    args = parser.parse_args(argv)
    if args.command == 'webhook' and args.webhook_command == 'redeliver' \
            and bool(args.speech_ids) == bool(args.all_failed):
        parser.error('webhook redeliver takes speechIDs or --all-failed')

    cfg_path = os.path.abspath(args.config)
    try:
        cfg = _config.load(cfg_path)
    except _config.ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        if args.command not in ('stop', 'status'):
            return 2
        # A daemon started from a good app.ini must stay stoppable after the file was broken.
        cfg = fallback_cfg(cfg_path)
        print('svcmgr: using pidfile %s' % cfg['setting']['pidfile'], file=sys.stderr)
    if args.command == 'start':
        return cmd_start(cfg, cfg_path)
    if args.command == 'run':
        return cmd_start(cfg, cfg_path, foreground=True)
    if args.command == 'stop':
        return cmd_stop(cfg)
    if args.command == 'restart':
        cmd_stop(cfg, quiet=True)
        return cmd_start(cfg, cfg_path)
    if args.command == 'status':
        return cmd_status(cfg)
    if args.command == 'reload':
        return cmd_reload(cfg, cfg_path)
    if args.command == 'transcribe':
        return cmd_transcribe(cfg, args.files, args.keep)
    if args.command == 'monitor':
        return cmd_monitor(cfg, args.type)
    if args.command == 'webhook' and args.webhook_command == 'list':
        return _webhook.cmd_list(cfg, args.json)
    if args.command == 'webhook':
        return _webhook.cmd_redeliver(cfg, args.speech_ids, args.all_failed)
    if args.command == 'db':
        return _db.command(cfg, args.db_command, os.path.join(_config.base_dir(cfg), 'records'))
    parser.error('unknown command')


if __name__ == '__main__':
    sys.exit(main())
