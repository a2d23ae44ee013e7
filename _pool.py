"""The PacketAgent worker pool of the master: one slot per worker process with its own Pipe,
heartbeat and exit sentinel in the loop; spawning, graceful retirement (reload, stop),
killing, respawning with backoff, and handing queued tasks to idle workers.
What a worker says goes to `on_state(slot, speechID, state)` and `on_done(slot, speechID,
outcome)`; a worker lost with a task in hand to `on_lost(speechID, reason)`.
"""
import logging
import signal
import time
from dataclasses import dataclass

import _children
import _worker
from _states import State, WorkerMsg

log = logging.getLogger('master')

HEARTBEAT_SLOTS = 1024


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
    leaving: str = None       # the worker said it leaves after its task (recycling)


class WorkerPool:
    """Worker processes numbered 1..N; `slots` holds the current ones, `retired` those
    finishing their last task after a reload or at stop."""

    def __init__(self, loop, cfg, engine, master_pid, extra_fds, on_state, on_done, on_lost):
        self.loop = loop
        self.engine = engine
        self.master_pid = master_pid
        self.extra_fds = extra_fds        # () -> master descriptors a child must close
        self.on_state, self.on_done, self.on_lost = on_state, on_done, on_lost
        self.slots = {}
        self.retired = []
        self.heartbeats = _children.MP.RawArray('d', HEARTBEAT_SLOTS)
        self.free_hb = list(range(HEARTBEAT_SLOTS - 1, -1, -1))
        self.respawn_at = {}              # number -> monotonic time
        self.backoffs = {}                # number -> Backoff
        self.restarts = 0
        self.stopping = False
        self.configure(cfg)

    def configure(self, cfg):
        self.cfg = cfg
        self.size = int(cfg['setting']['worker_processes'])
        self.heartbeat = float(cfg['setting']['heartbeat_secs'])

    @property
    def available(self):
        """True while a worker runs or is about to be started again."""
        return bool(self.slots) or bool(self.respawn_at)

    @property
    def gone(self):
        return not self.slots and not self.retired

    def start(self):
        for number in range(1, self.size + 1):
            self.spawn(number)

    def spawn(self, number):
        hb = self.free_hb.pop()
        self.heartbeats[hb] = time.monotonic()
        parent_end, child_end = _children.MP.Pipe(duplex=True)
        inherited = self.loop.fds() + list(self.extra_fds()) + [parent_end.fileno()]
        proc = _children.MP.Process(
            target=_worker.main, name='worker-%d' % number,
            args=(number, hb, child_end, self.engine, self.cfg, self.heartbeats, self.master_pid, inherited))
        proc.start()
        child_end.close()
        slot = WorkerSlot(number, hb, proc, parent_end, time.monotonic())
        self.slots[number] = slot
        self.loop.add(parent_end.fileno(), lambda mask: self._on_msg(slot), slot)
        self.loop.add(proc.sentinel, lambda mask: self._on_exit(slot), slot)
        log.info('master: worker %d started with pid %d', number, proc.pid)
        return slot

    # ------------------------------------------------------------ what workers say

    def _on_msg(self, slot):
        while slot.pipe_open:
            try:
                if not slot.conn.poll(0):
                    return
                kind, sid, payload = slot.conn.recv()
            except (EOFError, OSError):
                self._close_pipe(slot)
                return
            if slot.task != sid:
                log.warning('master: worker %d sent %s for speechID=%s, which it does not hold',
                            slot.number, kind, sid)
                continue
            if kind == WorkerMsg.STATE:
                self.on_state(slot, sid, State(payload))
            elif kind == WorkerMsg.LEAVING:
                slot.leaving = payload
            elif kind == WorkerMsg.DONE:
                slot.task = None
                slot.done += 1
                self.on_done(slot, sid, payload)
                if slot.leaving:
                    self.recycle(slot)
                elif slot.retiring:
                    self.retire(slot)

    def _close_pipe(self, slot):
        if slot.pipe_open:
            slot.pipe_open = False
            self.loop.remove(slot.conn.fileno())

    def _on_exit(self, slot):
        # A result sent just before the exit may still sit in the pipe: read it first.
        self._on_msg(slot)
        slot.proc.join(0.5)
        code = slot.proc.exitcode
        self.loop.remove(slot.proc.sentinel)
        self._close_pipe(slot)
        slot.conn.close()
        self.free_hb.append(slot.hb_index)
        why = _children.exit_reason(code)
        if slot in self.retired:
            self.retired.remove(slot)
            log.info('master: retired worker %d (pid %d) ended with %s', slot.number, slot.proc.pid, why)
            return
        if self.slots.get(slot.number) is slot:
            del self.slots[slot.number]
        reason = slot.killed_reason or 'died with %s' % why
        level = logging.INFO if self.stopping and code == 0 else logging.ERROR
        log.log(level, 'master: worker %d (pid %d) %s', slot.number, slot.proc.pid, reason)
        if slot.task:
            self.on_lost(slot.task, reason)
        if self.stopping:
            return
        lived = time.monotonic() - slot.started
        backoff = self.backoffs.setdefault(slot.number, _children.Backoff())
        delay = backoff.next(lived, excused=slot.task is not None or bool(slot.killed_reason))
        if backoff.failing:
            log.error('master: worker %d failed within %.1f s of starting; next try in %.0f s',
                      slot.number, lived, delay)
        self.respawn_at[slot.number] = time.monotonic() + delay
        self.restarts += 1

    # ------------------------------------------------------------ the master's commands

    def dispatch(self, tasks):
        """Hand queued tasks (TaskTable) to idle workers."""
        idle = [s for s in self.slots.values() if s.task is None and not s.retiring and s.pipe_open]
        while idle:
            task = tasks.next_pending()
            if task is None:
                return
            slot = idle.pop()
            try:
                slot.conn.send(task.job)
            except OSError as exc:
                log.error('master: could not hand speechID=%s to worker %d: %s', task.speech_id, slot.number, exc)
                tasks.requeue(task)
                continue
            slot.task, slot.task_since = task.speech_id, time.monotonic()
            task.handed_to(slot.number)

    def holder(self, task):
        """The slot working on `task`, or None."""
        slot = self.slots.get(task.worker) if task.worker is not None else None
        return slot if slot is not None and slot.task == task.speech_id else None

    def release(self, task):
        """A task ended elsewhere (timeout, stop): its worker's books no longer hold it."""
        slot = self.holder(task)
        if slot is not None:
            slot.task = None

    def retire(self, slot):
        """Ask a worker to leave after its task (reload, stop)."""
        slot.retiring = True
        if slot.task is None and not slot.told_to_leave and slot.pipe_open:
            slot.told_to_leave = True
            try:
                slot.conn.send(None)
            except OSError:
                pass

    def recycle(self, slot):
        """A worker that leaves on its own (max_tasks_per_worker, max_worker_memory_mb):
        a fresh one takes its number at once, no backoff."""
        if self.slots.get(slot.number) is slot and not self.stopping:
            del self.slots[slot.number]
            self.retired.append(slot)
            log.info('master: worker %d (pid %d) %s; starting a fresh one', slot.number, slot.proc.pid,
                     slot.leaving)
            self.retire(slot)
            self.spawn(slot.number)
        else:
            self.retire(slot)

    def retire_all(self):
        for slot in list(self.slots.values()) + self.retired:
            self.retire(slot)

    def kill(self, slot, reason):
        slot.killed_reason = reason
        _children.signal_pid(slot.proc.pid, signal.SIGKILL)

    def kill_stragglers(self):
        for slot in list(self.slots.values()) + self.retired:
            if slot.proc.is_alive():
                self.kill(slot, 'was killed: did not stop in time')

    def signal_all(self, sig):
        for slot in self.slots.values():
            _children.signal_pid(slot.proc.pid, sig)

    def reload(self, cfg, engine):
        """New workers with the new settings; the old ones finish their task and leave."""
        old = list(self.slots.values())
        self.slots = {}
        self.respawn_at.clear()
        for slot in old:
            self.retired.append(slot)
            self.retire(slot)
        self.configure(cfg)
        self.engine = engine
        self.start()

    def tick(self, now):
        stale = max(10.0, 5 * self.heartbeat)
        for slot in list(self.slots.values()):
            silent = now - self.heartbeats[slot.hb_index]
            if slot.task is None and not slot.killed_reason and silent > stale and now - slot.started > stale:
                log.error('master: worker %d sent no heartbeat for %.0f s while idle; killing it',
                          slot.number, silent)
                self.kill(slot, 'was killed: heartbeat stale')
        if self.stopping:
            return
        for number, at in list(self.respawn_at.items()):
            if number > self.size:
                del self.respawn_at[number]
            elif now >= at and number not in self.slots:
                del self.respawn_at[number]
                self.spawn(number)

    def describe(self):
        now = time.monotonic()
        return [{'worker': s.number, 'pid': s.proc.pid, 'speechID': s.task,
                 'busySecs': round(now - s.task_since, 3) if s.task else None, 'done': s.done}
                for s in sorted(self.slots.values(), key=lambda s: s.number)]

