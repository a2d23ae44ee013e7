"""Unit tests of the worker pool's decisions (_pool.py) and of respawn backoff (_children.py)
over real pipes, without forking workers: dispatch to idle workers only, a failed hand-over
requeued, messages from a worker that does not hold the task ignored, retirement."""
import multiprocessing
import time

import _children
from _jobs import Outcome
from _loop import EventLoop
from _pool import WorkerPool, WorkerSlot
from _states import Result, Source, State, WorkerMsg
from helpers import TaskHarness


class Pool:
    def __init__(self, tmp_path):
        self.h = TaskHarness(tmp_path, max_tasks=10)
        self.said = []
        self.pool = WorkerPool(EventLoop(), self.h.cfg, engine=None, master_pid=0, extra_fds=lambda: [],
                               on_state=lambda slot, sid, st: self.said.append(('state', slot.number, sid, st)),
                               on_done=lambda slot, sid, out: self.said.append(('done', slot.number, sid, out)),
                               on_lost=lambda sid, why: self.said.append(('lost', sid, why)))
        self.worker_ends = {}

    def slot(self, number):
        ours, theirs = multiprocessing.Pipe(duplex=True)
        slot = WorkerSlot(number, number, proc=None, conn=ours, started=time.monotonic())
        self.pool.slots[number] = slot
        self.worker_ends[number] = theirs
        return slot


def test_dispatch_hands_queued_tasks_to_idle_workers_only(tmp_path):
    p = Pool(tmp_path)
    busy, idle, retiring = p.slot(1), p.slot(2), p.slot(3)
    busy.task = 'already'
    retiring.retiring = True
    tasks = [p.h.table.admit(p.h.req('d%d' % i), Source.CLIENT) for i in range(3)]
    p.pool.dispatch(p.h.table)
    assert idle.task == 'd0' and tasks[0].worker == 2 and busy.task == 'already' and retiring.task is None
    job = p.worker_ends[2].recv()
    assert job.speech_id == 'd0' and job.candidates
    assert p.h.table.next_pending() is tasks[1]      # the rest still wait, in order


def test_a_failed_hand_over_is_requeued_at_the_front(tmp_path):
    p = Pool(tmp_path)
    broken = p.slot(1)
    broken.conn.close()
    task = p.h.table.admit(p.h.req('f1'), Source.CLIENT)
    p.pool.dispatch(p.h.table)
    assert broken.task is None and task.worker is None
    assert p.h.table.next_pending() is task


def test_messages_reach_the_master_only_from_the_worker_holding_the_task(tmp_path):
    p = Pool(tmp_path)
    slot = p.slot(1)
    slot.task = 's1'
    end = p.worker_ends[1]
    end.send((WorkerMsg.STATE, 'other', State.CONVERT.value))
    end.send((WorkerMsg.STATE, 's1', State.CONVERT.value))
    end.send((WorkerMsg.DONE, 's1', Outcome(State.DONE, Result.OK, transcript='x')))
    end.send((WorkerMsg.DONE, 's1', Outcome(State.DONE, Result.OK, transcript='again')))
    p.pool._on_msg(slot)
    assert [s[:4] for s in p.said if s[0] == 'state'] == [('state', 1, 's1', State.CONVERT)]
    done = [s for s in p.said if s[0] == 'done']
    assert len(done) == 1 and done[0][3].transcript == 'x' and slot.task is None and slot.done == 1


def test_retiring_tells_an_idle_worker_to_leave_once(tmp_path):
    p = Pool(tmp_path)
    p.slot(1)
    busy = p.slot(2)
    busy.task = 'b1'
    p.pool.retire_all()
    p.pool.retire_all()
    assert p.worker_ends[1].recv() is None and not p.worker_ends[1].poll(0.05)
    assert not p.worker_ends[2].poll(0.05) and busy.retiring
    # The busy one leaves after its task.
    p.worker_ends[2].send((WorkerMsg.DONE, 'b1', Outcome(State.DONE, Result.OK)))
    p.pool._on_msg(busy)
    assert p.worker_ends[2].recv() is None


def test_backoff_grows_only_for_children_that_fail_at_boot():
    pool = _children.Backoff()
    assert pool.next(lived=60) == 0.0 and not pool.failing
    assert [pool.next(lived=0.1) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert pool.failing
    assert pool.next(lived=0.1, excused=True) == 0.0          # killed, or it held a task
    scanner = _children.Backoff(base=1.0)
    assert scanner.next(lived=100) == 1.0 and scanner.next(lived=0.5) == 2.0 and scanner.next(lived=0.5) == 4.0
    assert _children.exit_reason(-9) == 'signal 9' and _children.exit_reason(0) == 'exit status 0'
