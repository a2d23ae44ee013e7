"""The master process: wires the rooms together (connections, task table, worker pool,
remote-engine broker, scanner link, reporter and monitor threads), routes each packet
type to its handler, and runs the loop with its timers, signals, reload and stop.
"""
import logging
import os
import signal
import threading
import time

import _children
import _cluster
import _config
import _db
import _engine
import _packet
import _records
import _reload
import _status
import _webhook
import _worker
from _conns import Conn, ConnServer, make_listener
from _jobs import Outcome
from _loop import EventLoop, drain, wake_pair
from _monitor import Monitor
from _packet import RequestError, Type
from _pool import WorkerPool
from _remote import EngineBroker
from _scanner_link import ScannerLink
from _states import Result, Source, State
from _tasks import Refused, TaskTable
from _web_end import WebLink, admit_http

log = logging.getLogger('master')

TICK_SECS = 0.1


class Master:
    """One selectors loop over the listening socket, every connection, every worker's pipe
    and exit sentinel, the scanner's socket and the signal wake-up fd."""

    def __init__(self, cfg, listener, engine, ready_fd=None, cfg_path=None):
        self.cfg = cfg
        self.cfg_path = cfg_path
        self.listener = listener
        self.engine = engine
        self.ready_fd = ready_fd
        self.pid = os.getpid()
        self.loop = EventLoop()
        self.signals = []
        self.stopping = False
        self.stop_deadline = None
        self.running = True
        self.reporter = self.webhook = self.db = self.monitor = self.cluster = None
        self.trial = _reload.Trial(lambda: self.engine.name, self.apply_config)   # a new engine on trial
        self.wake_r = self.wake_w = None
        self.tasks = TaskTable(cfg, lambda event, payload: self.reporter.submit(event, payload),
                               lambda: self.stopping, self.engine_available, self._answer, self._released,
                               row_id=lambda sid: self.db.row_id(sid) if self.db else None)
        self.tasks.cannot_record = lambda: self.reporter.blocked() if self.reporter else None
        self.counters = self.tasks.counters
        self.conns = ConnServer(self.loop, cfg, self.counters, self.on_frame, self.on_close)
        self.pool = WorkerPool(self.loop, cfg, engine, self.pid, self._extra_fds,
                               self.on_worker_state, self.on_worker_done, self.on_worker_lost)
        self.broker = EngineBroker(cfg, engine, self.tasks, self.conns.send, self.engine_changed)
        self.scanner = ScannerLink(self.loop, cfg, self.pid, self._extra_fds, self._admit_scanned,
                                   lambda: self.engine_available() and not self.stopping
                                   and not self.tasks.cannot_record())
        self.metrics = _status.Metrics()
        self.web = WebLink(self.loop, cfg, self.pid, self._extra_fds, admit_http(self.tasks),
                           lambda tasks=True: _status.snapshot(self, self.metrics, tasks))
        self.handlers = {Type.TRANSCRIBE: self.on_transcribe, Type.MONITOR: self.on_monitor,
                         Type.LOGIN: self.broker.on_login, Type.RECOGNIZE_RESP: self.broker.on_recognized}

    # ------------------------------------------------------------ start-up

    def start(self):
        self.wake_r, self.wake_w = wake_pair()
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.loop.add(self.wake_r, lambda mask: drain(self.wake_r), 'wake-up fd')
        self.conns.listen(self.listener)
        # Children before threads: forking a process that runs threads is unsafe.
        self.pool.start()
        self.scanner.start()
        self.web.start()
        self.reporter = _records.Reporter(self.make_sinks())
        self.reporter.sinks += [self.metrics, self.web]
        # Last sinks: the scanner, and the cluster's answer, only once every trace of a task is made.
        self.reporter.sinks.append(self.scanner)
        if self.cfg['cluster']['enabled']:
            self.cluster = _cluster.Cluster(self.loop, self.cfg, self.tasks, self.capacity, self.conns, self.scanner,
                                           self.web, stop=self.begin_stop)
            self.tasks.forward = self.cluster.admit
            self.reporter.sinks.append(self.cluster)
            self.cluster.start()
        self.reporter.start()
        self.monitor = Monitor(float(self.cfg['setting']['monitor_interval_secs']),
                               on_refresh=self.db.status_hook(self.status_facts) if self.db else None)
        self.monitor.start()
        threading.Thread(target=_worker.sweep_at_start, args=(self.cfg, time.time()), name='temp-sweep',
                         daemon=True).start()
        log.info('master: listening on %s:%s with %d worker(s), engine %s, max_tasks %d',
                 *self.listener.getsockname()[:2], self.pool.size, self.engine.name, self.tasks.max_tasks)
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b'ok\n')
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None
        _children.sd_notify('READY=1\nMAINPID=%d' % os.getpid())

    def make_sinks(self):
        records = os.path.join(_config.base_dir(self.cfg), 'records')
        sinks = [_records.RecordsFile(_config.records_dir(self.cfg))]
        if self.cfg['webhook']['url']:
            # Its sender threads start here, after the children, and drain what an earlier run left.
            self.webhook = _webhook.WebhookSink(_webhook.Settings.from_cfg(self.cfg),
                                                _webhook.Outbox(_webhook.outbox_dir(self.cfg)))
            self.webhook.start()
            sinks.append(self.webhook)
        if self.cfg['db']['enabled']:
            # Its writer thread (and its connection, made inside it) starts here, after the children.
            self.db = _db.DatabaseSink(self.cfg, records)
            sinks.append(self.db)
        return sinks

    def _extra_fds(self):
        """Descriptors of the master outside the loop that a forked child must close."""
        fds = [self.wake_w.fileno(), self.scanner.notify_w.fileno(), self.web.notify_w.fileno()]
        if self.conns.spare_fd is not None:
            fds.append(self.conns.spare_fd)
        if self.cluster is not None:
            fds += self.cluster.fds()
        return fds

    def _on_signal(self, signum, frame):
        # Only note it; the loop acts (the wake-up fd has already been written).
        self.signals.append(signum)

    # ------------------------------------------------------------ the rooms' callbacks

    def engine_available(self):
        return self.pool.available if self.engine.embedded else self.broker.available

    def engine_changed(self):
        self.scanner.tell_engine()

    def capacity(self):
        """Tasks this node takes from the cluster's queue at once: its workers, plus the free
        recognition slots of the legacy engines logged in (a worker only prepares their audio)."""
        if self.tasks.cannot_record():
            return 0        # a task taken now could end with no record: let another node have it
        if self.engine.embedded:
            return self.pool.size if self.pool.available else 0
        return len(self.broker.engines) * self.broker.concurrency + self.pool.size if self.broker.available else 0

    def _answer(self, task, body):
        if task.origin is not None:
            return self.cluster.answered(task, body)
        conn = task.conn
        if conn is None:
            return None
        if conn.closed:
            return False
        self.conns.send(conn, Type.TRANSCRIBE_RESP, body)
        return True

    def _released(self, task):
        self.pool.release(task)
        self.broker.release(task)

    def _admit_scanned(self, req, keep_source, file_path=None):
        # The worker leaves the source alone: the scanner moves it once the record is written.
        return self.tasks.admit(req, Source.SCANNER, keep_source=keep_source, file_path=file_path)

    def on_worker_state(self, slot, sid, state):
        task = self.tasks.get(sid)
        if task is not None:
            self.tasks.move(task, state)

    def on_worker_done(self, slot, sid, outcome):
        task = self.tasks.get(sid)
        if task is None:
            return
        if outcome.prepared:
            self.broker.prepared(task, outcome)
        else:
            self.tasks.end(task, outcome)

    def on_worker_lost(self, sid, reason):
        task = self.tasks.get(sid)
        if task is not None:
            self.tasks.worker_lost(task, reason, int(self.cfg['task']['retry_on_worker_death']))

    def on_close(self, conn):
        if conn.engine is not None:
            self.broker.lost(conn)
        if conn.tasks:
            log.info('master: %s left with %d task(s) in progress; they finish and are recorded with result 8',
                     conn.name, len(conn.tasks))

    def status_facts(self):
        """What the database's node-status row takes from the master (read by the monitor thread)."""
        queued = len(self.tasks.pending)
        return {'engine_type': self.engine.name, 'engine_up': bool(self.engine_available()),
                'workers': len(self.pool.slots), 'tasks_running': max(0, len(self.tasks) - queued),
                'tasks_queued': queued, 'max_tasks': self.tasks.max_tasks}

    # ------------------------------------------------------------ requests

    def on_frame(self, conn, ptype, body):
        handler = self.handlers.get(ptype)
        if handler is not None:
            handler(conn, body)
        elif 1000 <= ptype < 2000:
            log.warning('master: %s: unsupported packet type %d', conn.name, ptype)
            self.conns.send(conn, ptype + 1000, {'result': Result.UNSUPPORTED.value,
                                                 'message': 'unsupported packet type %d' % ptype})
        else:
            log.warning('master: %s: unexpected packet type %d (%d bytes) ignored', conn.name, ptype, len(body))

    def reject(self, conn, req, result, message):
        sid = req.get('speechID') if isinstance(req, dict) else None
        log.warning('master: %s speechID=%s: rejected with %s: %s', conn.name, sid, result.value, message)
        self.counters['rejected'] += 1
        self.conns.send(conn, Type.TRANSCRIBE_RESP, _packet.error_body(req, result, State.NONE, message))

    def on_transcribe(self, conn, body):
        try:
            req = _packet.check_transcribe(_packet.decode_json(Type.TRANSCRIBE, body))
        except RequestError as exc:
            self.reject(conn, _packet.loose_json(body), Result.BAD_REQUEST, exc.message)
            return
        held = self.scanner.holds(req)
        if held:
            self.reject(conn, req, Result.BAD_REQUEST, held)
            return
        try:
            self.tasks.admit(req, Source.CLIENT, conn)
        except Refused as exc:
            self.reject(conn, req, exc.result, exc.message)

    def on_monitor(self, conn, body):
        try:
            req = _packet.decode_json(Type.MONITOR, body)
        except RequestError as exc:
            self.conns.send(conn, Type.MONITOR_RESP,
                            _packet.error_body(None, Result.BAD_REQUEST, State.NONE, exc.message))
            return
        kind = req.get('type', 'all')
        if kind != 'all' and kind not in _status.MONITOR_PARTS:
            self.conns.send(conn, Type.MONITOR_RESP, _packet.error_body(
                req, Result.BAD_REQUEST, State.NONE, 'type must be one of all, %s' % ', '.join(_status.MONITOR_PARTS)))
            return
        self.conns.send(conn, Type.MONITOR_RESP, _status.monitor_body(self, kind))

    # ------------------------------------------------------------ timers and signals

    def tick(self):
        now = time.monotonic()
        for task in self.tasks.expired(now):
            slot = self.pool.holder(task)
            if slot is not None:
                log.error('master: worker %d stuck on speechID=%s past its deadline; killing it',
                          slot.number, task.speech_id)
                self.pool.kill(slot, 'was killed: stuck past the task deadline')
            self.tasks.end(task, Outcome.failed(
                State.TIMEOUT, Result.TIMEOUT,
                'the task did not finish within session_timeout_secs (%g s)' % self.tasks.timeout))
        self.trial.check(now)
        self.conns.tick(now)
        self.pool.tick(now)
        self.scanner.tick(now)
        self.web.tick(now)
        if self.cluster is not None:
            self.cluster.tick(now)

    def handle_signals(self):
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(signal.Signals(sig).name)
            elif sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGUSR1:
                _config.reopen_logs()
                self.pool.signal_all(signal.SIGUSR1)
                self.scanner.signal(signal.SIGUSR1)
                self.web.signal(signal.SIGUSR1)
                log.info('master: log files reopened')

    def reload(self):
        """SIGHUP: load app.ini and check everything it needs without risk; a new embedded
        engine model is tried in a probe process first (applied in tick() once it passed)."""
        path = self.cfg_path or self.cfg.filename
        try:
            cfg = _config.load(path)
        except _config.ConfigError as exc:
            for line in exc.problems:
                log.error('master: reload refused: %s', line)
            return
        problems = _reload.preflight(cfg)
        for line in problems:
            log.error('master: reload refused, keeping the running configuration: %s', line)
        if problems:
            return
        _reload.keep_restart_sections(cfg, self.cfg)
        self.trial.cancel('a newer reload came')
        if dict(cfg['engine']) != dict(self.cfg['engine']) and cfg['engine']['type'] != 'remote':
            self.trial.start(cfg, path)
            return
        self.apply_config(cfg)

    def apply_config(self, cfg):
        log.info('master: reloading %s', cfg.filename)
        old_listen = (self.cfg['server']['ip'], int(self.cfg['server']['port']))
        old_engine = dict(self.cfg['engine'])
        self.cfg = cfg
        try:
            _config.setup_logging(cfg, 'master')
        except OSError as exc:
            log.error('master: cannot log to %s (%s); logging stays where it was', cfg['setting']['log_path'], exc)
        new_listen = (cfg['server']['ip'], int(cfg['server']['port']))
        if new_listen != old_listen:
            try:
                self.listener = make_listener(*new_listen)
            except OSError as exc:
                log.error('master: cannot listen on %s:%s (%s); keeping %s:%s', *new_listen, exc, *old_listen)
            else:
                self.conns.listen(self.listener)
        stale = self.engine.stale()     # e.g. Vosk's dither-off overlay no longer matches the model
        if stale:
            log.warning('master: reloading the engine: %s', stale)
        if dict(cfg['engine']) != old_engine or stale:
            engine = _engine.make_engine(cfg)
            try:
                engine.load()       # the probe loaded these very files already
            except _engine.EngineError as exc:
                log.error('master: new engine could not be loaded (%s); keeping %s', exc, self.engine.name)
            else:
                self.engine = engine
        self.tasks.configure(cfg)
        self.conns.configure(cfg)
        self.broker.configure(cfg, self.engine)
        # Workers restart gracefully: the old ones finish their task, new ones take new jobs.
        self.pool.reload(cfg, self.engine)
        self.scanner.reload(cfg)
        self.web.reload(cfg)
        log.info('master: reload done: %d worker(s)', self.pool.size)

    # ------------------------------------------------------------ stop

    def _end_for_stop(self, task, message):
        # A scanned file gets no answer and no record: it stays in .processing for the next start.
        if task.origin is not None:
            self.cluster.stopped(task)      # back to the cluster's queue for another node
        self.tasks.end(task, None if task.source == Source.SCANNER or task.origin is not None else
                       Outcome.failed(State.ERROR, Result.UNAVAILABLE, message))

    def begin_stop(self, why):
        if self.stopping:
            return
        self.stopping = True
        self.pool.stopping = True
        self.trial.cancel('stopping')
        _children.sd_notify('STOPPING=1')
        self.stop_deadline = time.monotonic() + float(self.cfg['setting']['graceful_timeout_secs'])
        log.info('master: %s received: stopping (graceful timeout %g s, %d task(s) in progress)',
                 why, float(self.cfg['setting']['graceful_timeout_secs']), len(self.tasks))
        self.conns.close_listener()
        self.scanner.stop()
        self.web.stop()
        for sid in list(self.tasks.pending):
            task = self.tasks.get(sid)
            if task is not None:
                self._end_for_stop(task, 'the service manager is shutting down')
        self.tasks.pending.clear()
        self.pool.retire_all()

    def stop_progress(self):
        """During a stop: end what the graceful timeout did not let finish, and leave once all is out."""
        now = time.monotonic()
        if now >= self.stop_deadline and len(self.tasks):
            log.warning('master: graceful timeout: ending %d running task(s) with result 3', len(self.tasks))
            for task in self.tasks.values():
                self._end_for_stop(task, 'the service manager stopped before the task finished')
        if not len(self.tasks):
            # Tasks ended by the deadline left their workers busy in our books only: release them too.
            self.pool.retire_all()
        if now >= self.stop_deadline + 5:
            self.pool.kill_stragglers()
            self.scanner.kill()
            self.web.kill()
        if self.cluster is not None and now >= self.stop_deadline:
            self.cluster.end_waiting('the service manager stopped before the cluster answered')
        if not len(self.tasks) and self.pool.gone and self.scanner.gone and self.web.gone and \
                (self.cluster is None or self.cluster.idle()):
            self.running = False

    # ------------------------------------------------------------ loop

    def _on_handler_error(self, owner):
        if isinstance(owner, Conn):
            self.conns.close(owner)

    def serve(self):
        self.start()
        next_tick = 0.0
        while self.running:
            now = time.monotonic()
            self.loop.run_once(max(0.0, min(next_tick - now, TICK_SECS)), self._on_handler_error)
            self.handle_signals()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_SECS
                self.tick()
            if not self.stopping:
                self.pool.dispatch(self.tasks)
            else:
                self.stop_progress()
        self.finish()

    def finish(self):
        self.conns.finish()
        self.monitor.stop()
        self.reporter.stop()
        if self.cluster is not None:
            self.cluster.stop()     # after the reporter: the answers of the last tasks go out first
        log.info('master: stopped (%d records written)', self.reporter.written)
