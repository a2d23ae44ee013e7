"""Unit tests of the master's task table (_tasks.py) without a daemon: admission, state
moves, the retry decision after a worker death, the answer and the record a task ends with."""
import json
import os

import pytest

from _jobs import Outcome
from _records import ACCEPTED, FINAL, STATE, TaskRecord
from _states import Mark, Result, Source, State, can_move
from _tasks import Refused, answer_body, build_record
from helpers import FakeConn, TaskHarness


@pytest.fixture
def h(tmp_path):
    return TaskHarness(tmp_path)


# ------------------------------------------------------------------ state moves

def test_state_moves_forward_back_only_to_retry_and_never_out_of_a_final_state():
    assert can_move(State.INIT, State.CONVERT) and can_move(State.CONVERT, State.RECOGNIZE)
    assert can_move(State.INIT, State.RECOGNIZE)
    assert not can_move(State.RECOGNIZE, State.CONVERT) and not can_move(State.CONVERT, State.INIT)
    assert can_move(State.CONVERT, State.INIT, retry=True) and can_move(State.RECOGNIZE, State.INIT, retry=True)
    assert not can_move(State.INIT, State.INIT, retry=True)
    for final in (State.DONE, State.ERROR, State.TIMEOUT, State.NOFILE_ID):
        assert can_move(State.INIT, final) and can_move(State.RECOGNIZE, final)
        assert not any(can_move(final, s) for s in State)


def test_moves_go_through_one_method_that_refuses_illegal_ones_and_stamps_worker_get(h):
    task = h.table.admit(h.req('m1'), Source.CLIENT)
    task.handed_to(1)
    assert h.table.move(task, State.CONVERT) and task.state == State.CONVERT
    assert not h.table.move(task, State.CONVERT)           # no-op
    assert not h.table.move(task, State.INIT)              # backwards without a retry
    assert h.table.move(task, State.RECOGNIZE)
    marks = [m for m, _ in task.marks]
    assert marks == [Mark.TRANSCRIBE_START, Mark.WORKER_PUT, Mark.WORKER_GET]
    states = [p['state'] for ev, p in h.events if ev == STATE]
    assert states == ['CONVERT', 'RECOGNIZE']


# ------------------------------------------------------------------ admission

def test_admission_checks_in_order_and_counts_max_tasks_exactly(h):
    conn = FakeConn()
    tasks = [h.table.admit(h.req('a%d' % i), Source.CLIENT, conn) for i in range(3)]
    assert [t.speech_id for t in tasks] == ['a0', 'a1', 'a2'] and conn.tasks == {'a0', 'a1', 'a2'}
    with pytest.raises(Refused) as exc:
        h.table.admit(h.req('a3'), Source.CLIENT)
    assert exc.value.result == Result.TOO_MANY and 'max_tasks (3)' in exc.value.message
    with pytest.raises(Refused) as exc:
        h.table.admit(h.req('a0'), Source.CLIENT)
    assert exc.value.result == Result.ALREADY_CONNECTED
    h.stop = True
    with pytest.raises(Refused) as exc:
        h.table.admit(h.req('a0'), Source.CLIENT)
    assert exc.value.result == Result.UNAVAILABLE and 'shutting down' in exc.value.message
    accepted = [p for ev, p in h.events if ev == ACCEPTED]
    assert [p['speechID'] for p in accepted] == ['a0', 'a1', 'a2']
    assert accepted[0]['source'] == 'client' and accepted[0]['request'] == {
        'filePath': h.root, 'fileID': 'a.wav', 'fileName': 'a.wav'}


def test_admission_refuses_paths_outside_the_roots_and_relative_ones(h, tmp_path):
    outside = str(tmp_path / 'elsewhere')
    os.makedirs(outside)
    for req, words in ((h.req('x1', name='../../etc/passwd'), 'outside the allowed roots'),
                       (dict(h.req('x2'), filePath=outside), 'outside the allowed roots'),
                       (dict(h.req('x3'), filePath='data'), 'absolute path'),
                       (h.req('x4', audioPath=outside), 'audioPath'),
                       (h.req('x5', audioPath='out'), 'absolute path')):
        with pytest.raises(Refused) as exc:
            h.table.admit(req, Source.CLIENT)
        assert exc.value.result == Result.BAD_REQUEST and words in exc.value.message, req
    os.symlink(outside, os.path.join(h.root, 'link'))
    with pytest.raises(Refused):
        h.table.admit(h.req('x6', name='link/a.wav'), Source.CLIENT)
    assert len(h.table) == 0 and not h.events


def test_no_engine_refuses_with_3_and_a_missing_speech_id_is_made(h):
    h.up = False
    with pytest.raises(Refused) as exc:
        h.table.admit(h.req(), Source.SCANNER)
    assert exc.value.result == Result.UNAVAILABLE
    h.up = True
    task = h.table.admit(h.req(), Source.SCANNER, keep_source=True)
    assert len(task.speech_id) == len('20210125_112014_082971') and task.job.keep_source
    assert task.job.audio_path.startswith(h.cfg['directory']['audio_target_path'])
    assert task.job.candidates == [os.path.join(h.root, 'a.wav')] * 2


# ------------------------------------------------------------------ queue, retries, the end

def test_queue_order_requeue_and_retry_decision(h):
    a, b = (h.table.admit(h.req(s), Source.CLIENT) for s in ('q1', 'q2'))
    assert h.table.next_pending() is a
    a.handed_to(1)
    h.table.move(a, State.CONVERT)
    h.table.worker_lost(a, 'died with signal 9', retries=1)
    assert a.state == State.INIT and a.attempts == 1 and a.worker is None
    assert h.table.next_pending() is a and h.table.next_pending() is b and h.table.next_pending() is None
    a.handed_to(2)
    h.table.worker_lost(a, 'died with signal 9', retries=1)
    assert 'q1' not in h.table
    final = [p for ev, p in h.events if ev == FINAL][0]
    assert (final.result, final.state) == (Result.ERROR, State.ERROR)
    assert final.message == 'the worker processing this task died with signal 9'
    assert h.released and h.released[0] is a


def test_end_answers_records_once_and_a_client_that_left_gets_8(h):
    conn = FakeConn()
    task = h.table.admit(h.req('e1', customer='c9'), Source.CLIENT, conn)
    task.handed_to(1)
    h.table.move(task, State.CONVERT)
    h.delivered = False     # the client is gone
    outcome = Outcome(State.DONE, Result.OK, transcript='hi there', channels=[{'channel': 'A', 'transcript': 'hi there'}],
                      duration=1.5, source_channels=2, audio_wav='e1.wav')
    h.table.end(task, outcome)
    h.table.end(task, outcome)              # a second end of the same task does nothing
    finals = [p for ev, p in h.events if ev == FINAL]
    assert len(finals) == 1 and len(h.answers) == 1
    rec = finals[0]
    assert isinstance(rec, TaskRecord) and rec.result == Result.DISCONNECTED and rec.engine_result == '0'
    assert rec.source_channels == 2 and rec.audio_path == task.job.audio_path and rec.socket == 42
    assert rec.request == {'filePath': h.root, 'fileID': 'a.wav', 'fileName': 'a.wav', 'customer': 'c9'}
    assert [m for m, _ in rec.marks][-1] == Mark.TRANSCRIBE_END and rec.seq == 1
    assert conn.tasks == set() and h.table.counters['result_8'] == 1


def test_answer_body_is_what_1_0_clients_know():
    class T:
        speech_id = 's1'
        request = {'speechID': 's1', 'filePath': '/d', 'fileID': 'x.wav'}
    ok = Outcome(State.DONE, Result.OK, transcript='hello', channels=[{'channel': 'A', 'transcript': 'hello'}],
                 duration=1.25, audio_wav='s1.wav', audio_mp3=None)
    body = answer_body(T, ok, State.DONE, Result.OK)
    assert json.dumps(body) == json.dumps({
        'result': '0', 'state': 'DONE', 'speechID': 's1', 'transcript': 'hello',
        'channels': [{'channel': 'A', 'transcript': 'hello'}], 'duration': 1.25, 'audioWAV': 's1.wav',
        'audioMP3': None, 'transcipt': 'hello'})
    remote = Outcome(State.DONE, Result.OK, transcript='hi', duration=2.0, audio_wav='s1.wav', audio_mp3='s1.mp3')
    assert list(answer_body(T, remote, State.DONE, Result.OK)) == [
        'result', 'state', 'speechID', 'transcript', 'duration', 'audioWAV', 'audioMP3', 'transcipt']
    err = answer_body(T, Outcome.failed(State.NOFILE_ID, Result.NOT_FOUND, 'fileID not found: /d/x.wav'),
                      State.NOFILE_ID, Result.NOT_FOUND)
    assert err == {'speechID': 's1', 'filePath': '/d', 'fileID': 'x.wav', 'result': '4', 'state': 'NOFILE_ID',
                   'message': 'fileID not found: /d/x.wav'}


def test_the_record_builder_and_its_line_round_trip(h):
    task = h.table.admit(h.req('r1'), Source.SCANNER)
    task.handed_to(2)
    h.table.move(task, State.CONVERT)
    rec = build_record(task, Outcome(State.DONE, Result.OK, transcript='t', duration=3.0, source_channels=1,
                                     channels=[{'channel': 'A', 'transcript': 't'}]), State.DONE, Result.OK)
    line = rec.to_line()
    assert list(line)[:10] == ['data', 'socket', 'state', 'startTime', 'endTime', 'processInterval', 'source',
                               'worker', 'duration', 'request']
    assert line['data'] == {'speechID': 'r1', 'transcript': 't', 'result': '0'} and line['source'] == 'scanner'
    assert [m.split(' < ')[1] for m in line['processInterval']] == ['TRANSCRIBE_START', 'WORKER_PUT', 'WORKER_GET']
    back = TaskRecord.from_line(json.loads(json.dumps(line)))
    assert back.to_line() == line
    assert TaskRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    assert abs(back.created - rec.created) < 1e-6 and back.marks[2][0] == Mark.WORKER_GET


def test_seq_counts_per_day_from_what_is_recorded(h, tmp_path):
    import time
    records = tmp_path / 'records'
    records.mkdir()
    (records / (time.strftime('%Y%m%d') + '.json')).write_text('{"seq": 41}\nnot json "seq"\n{"seq": 7}\n')
    assert h.table.next_seq() == 42 and h.table.next_seq() == 43


SEGS = [{'seq': 1, 'channel': 'A', 'start': 0.2, 'end': 1.1, 'text': 'hello', 'confidence': 0.8,
         'lowConfidence': False, 'words': [{'word': 'hello', 'start': 0.2, 'end': 1.1, 'confidence': 0.8}]}]


def test_segments_reach_the_answer_only_when_asked_and_always_the_record(h):
    ok = Outcome(State.DONE, Result.OK, transcript='hello', channels=[{'channel': 'A', 'transcript': 'hello'}],
                 duration=1.25, audio_wav='s.wav', segments=SEGS, confidence=0.8)
    plain = h.table.admit(h.req('p1'), Source.CLIENT)
    asked = h.table.admit(h.req('p2', segments=True), Source.CLIENT)
    declined = h.table.admit(h.req('p3', segments=False), Source.CLIENT)
    bodies = {t.speech_id: answer_body(t, ok, State.DONE, Result.OK) for t in (plain, asked, declined)}
    assert 'segments' not in bodies['p1'] and 'confidence' not in bodies['p1']
    assert bodies['p3'] == dict(bodies['p1'], speechID='p3')
    assert list(bodies['p2'])[-3:] == ['transcipt', 'segments', 'confidence']
    assert bodies['p2']['segments'] == SEGS and bodies['p2']['confidence'] == 0.8
    for task in (plain, asked):
        h.table.end(task, ok)
    recs = [p for ev, p in h.events if ev == FINAL]
    assert [r.segments for r in recs] == [SEGS, SEGS] and recs[0].confidence == 0.8
    line = recs[0].to_line()
    assert line['segments'] == SEGS and line['confidence'] == 0.8
    assert TaskRecord.from_line(json.loads(json.dumps(line))).segments == SEGS
    # Monitor's recent tasks carry the confidence.
    assert [(r['speechID'], r['result'], r['confidence']) for r in h.table.describe_recent()] == [
        ('p1', '0', 0.8), ('p2', '0', 0.8)]
