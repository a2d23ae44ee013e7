"""Tests of _webhook: the outbox files, the sender pool against a real HTTP server in this
process (signatures, retries, timeouts, redirects, 410, Retry-After, giving up, the CLI),
and end to end with the real daemon (delivery, SIGKILL with a full outbox, redeliver)."""
import base64
import hashlib
import hmac
import json
import os
import signal
import threading
import time

import psutil
import pytest

from conftest import expected_texts, free_port, transcribe_req, wait_for
from helpers import Receiver, monitor
import _webhook
from _records import FINAL, TaskRecord
from _webhook import Outbox, Settings, WebhookSink

TEXTS = expected_texts()
KEY = b'0123456789abcdef0123456789abcdef'
SECRET = 'whsec_' + base64.b64encode(KEY).decode()


@pytest.fixture
def receivers():
    made = []

    def make(**kw):
        r = Receiver(**kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


def settings(url, **kw):
    opts = dict(key=KEY, connect_timeout=1.0, read_timeout=1.0, concurrency=2, backoff_base=0.05,
                backoff_max=0.2, give_up_after=3600, max_attempts=0, rescan=0.2)
    opts.update(kw)
    return Settings(url=url, **opts)


@pytest.fixture
def make_sink(tmp_path):
    made = []

    def make(url, **kw):
        sink = WebhookSink(settings(url, **kw), Outbox(str(tmp_path / 'records' / 'webhook')))
        sink.start()
        made.append(sink)
        return sink
    yield make
    for sink in made:
        sink.close()


def record(sid, text='hello customer', result='0', state='DONE', **extra):
    """A task's record as the master builds it (given here as its records line)."""
    rec = {'data': {'speechID': sid, 'transcript': text, 'result': result}, 'socket': 7, 'state': state,
           'startTime': '2021.01.25 11:20:14.082971', 'endTime': '2021.01.25 11:20:15.120000',
           'processInterval': ['0.000143 < TRANSCRIBE_START', '1.037000 < TRANSCRIBE_END'],
           'source': 'client', 'worker': 1, 'duration': 12.48,
           'request': {'domainName': 'SGDefault', 'domainCode': 'SG0001', 'fileID': sid + '.wav',
                       'fileName': 'call-0001.wav', 'filePath': '/data/batch'},
           'channels': [{'channel': 'A', 'transcript': text}], 'audioWAV': sid + '.wav'}
    rec.update(extra)
    return TaskRecord.from_line(rec)


def verify(req, key=KEY):
    """Check a request's signature the way a receiver would, without _webhook's code."""
    h = req['headers']
    signed = ('%s.%s.' % (h['webhook-id'], h['webhook-timestamp'])).encode() + req['body']
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sigs = [s.split(',', 1)[1] for s in h['webhook-signature'].split() if s.startswith('v1,')]
    return any(hmac.compare_digest(expected, s) for s in sigs)


def entries(sink, failed=False):
    box = sink.outbox
    return {name: box.read(name, failed) for name in box.names(failed)}


# ------------------------------------------------------------------ payload and signature

def test_payload_fields_and_the_result_conflict():
    rec = record('s1', text='A: hello\nB: hi', channels=[{'channel': 'A', 'transcript': 'hello'},
                                                         {'channel': 'B', 'transcript': 'hi'}])
    rec.request.update(customerId='c-9', result='forged', sttKey='forged')
    rec.audio_path = '/data/batch/rec_mp3/20210125'
    p = _webhook.build_payload(rec)
    # Top level follows the protocol: result is the code, transcript the text.
    assert p['speechID'] == 's1' and p['result'] == '0' and p['state'] == 'DONE'
    assert p['transcript'] == 'A: hello\nB: hi' and p['duration'] == 12.48
    assert p['channels'] == rec.channels
    assert (p['domainName'], p['domainCode'], p['fileID'], p['fileName'], p['filePath']) == \
        ('SGDefault', 'SG0001', 's1.wav', 'call-0001.wav', '/data/batch')
    assert p['audioPath'] == '/data/batch/rec_mp3/20210125' and p['audioWAV'] == 's1.wav'
    assert p['startTime'] == rec.to_line()['startTime'] and p['processInterval'] == rec.to_line()['processInterval']
    # 1.0's row fields, task-level at the top ...
    assert (p['sttKey'], p['key'], p['filename'], p['seq']) == ('s1', 's1.wav', 'call-0001.wav', None)
    assert (p['regDate'], p['regTime'], p['callTime']) == ('20210125', '112014', 12.48)
    # ... and per channel in segments, where result is the text as 1.0 named it.
    assert p['segments'] == [
        {'sttKey': 's1', 'key': 's1.wav', 'filename': 'call-0001.wav', 'seq': None, 'regDate': '20210125',
         'regTime': '112014', 'callTime': 12.48, 'channel': 'A', 'start': 0.0, 'end': 12.48, 'result': 'hello'},
        {'sttKey': 's1', 'key': 's1.wav', 'filename': 'call-0001.wav', 'seq': None, 'regDate': '20210125',
         'regTime': '112014', 'callTime': 12.48, 'channel': 'B', 'start': 0.0, 'end': 12.48, 'result': 'hi'}]
    # Unknown request fields are forwarded; they never overwrite svcmgr's own keys.
    assert p['customerId'] == 'c-9' and p['result'] == '0' and p['sttKey'] == 's1'
    err = _webhook.build_payload(record('s2', text='', result='4', state='NOFILE_ID', channels=None,
                                        duration=None, message='fileID not found: /data/batch/s2.wav'))
    assert err['result'] == '4' and err['message'].startswith('fileID not found')
    assert err['segments'] == [] and err['callTime'] is None


def test_payload_segments_carry_each_utterances_times_and_text():
    segs = [{'seq': 1, 'channel': 'A', 'start': 0.21, 'end': 2.3, 'text': 'hello', 'confidence': 0.7,
             'lowConfidence': False, 'words': [{'word': 'hello', 'start': 0.21, 'end': 2.3, 'confidence': 0.7}]},
            {'seq': 2, 'channel': 'B', 'start': 2.0, 'end': 4.2, 'text': 'hi there', 'confidence': 0.4,
             'lowConfidence': True, 'words': []}]
    p = _webhook.build_payload(record('s3', text='A: hello\nB: hi there', segments=segs, confidence=0.55,
                                      channels=[{'channel': 'A', 'transcript': 'hello'},
                                                {'channel': 'B', 'transcript': 'hi there'}]))
    assert p['confidence'] == 0.55
    row = {'sttKey': 's3', 'key': 's3.wav', 'filename': 'call-0001.wav', 'seq': None, 'regDate': '20210125',
           'regTime': '112014', 'callTime': 12.48}
    assert p['segments'] == [
        dict(row, segmentSeq=1, channel='A', start=0.21, end=2.3, result='hello', text='hello', confidence=0.7,
             lowConfidence=False, words=segs[0]['words']),
        dict(row, segmentSeq=2, channel='B', start=2.0, end=4.2, result='hi there', text='hi there', confidence=0.4,
             lowConfidence=True, words=[])]


def test_delivery_is_signed_and_verifies(receivers, make_sink):
    rx = receivers()
    sink = make_sink(rx.url)
    sink.handle(FINAL, record('sig-1', text='안녕하세요 고객님', audioPath='/data/out'))
    wait_for(lambda: len(rx.requests) == 1, 10, 'the delivery')
    req = rx.requests[0]
    h = req['headers']
    assert h['content-type'] == 'application/json; charset=utf-8'
    assert h['webhook-id'].startswith('msg_')
    assert abs(int(h['webhook-timestamp']) - time.time()) < 60
    assert verify(req)
    assert not verify(req, key=b'another key')
    body = json.loads(req['body'].decode('utf-8'))
    assert body['transcript'] == '안녕하세요 고객님' and body['audioPath'] == '/data/out'
    wait_for(lambda: sink.status()['delivered'] == 1, 5, 'the delivered count')
    assert entries(sink) == {} and sink.status()['pending'] == 0


def test_plain_text_secret_and_no_secret(receivers, make_sink):
    rx = receivers()
    plain = make_sink(rx.url, key=_webhook.signing_key('not base64, just text'))
    plain.handle(FINAL, record('plain-1'))
    wait_for(lambda: len(rx.requests) == 1, 10, 'the signed delivery')
    assert verify(rx.requests[0], key=b'not base64, just text')
    unsigned = make_sink(rx.url, key=None)
    unsigned.handle(FINAL, record('plain-2'))
    wait_for(lambda: len(rx.requests) == 2, 10, 'the unsigned delivery')
    assert 'webhook-signature' not in rx.requests[1]['headers']
    assert _webhook.signing_key('') is None
    with pytest.raises(ValueError):
        _webhook.signing_key('whsec_not*base64')


# ------------------------------------------------------------------ failures and retries

def test_receiver_down_then_up_nothing_lost_duplicates_share_an_id(receivers, make_sink):
    port = free_port()                               # nothing listens there yet
    sink = make_sink('http://127.0.0.1:%d/hook' % port, concurrency=4, read_timeout=0.3)
    sids = ['down-%02d' % i for i in range(30)]
    for sid in sids:
        sink.handle(FINAL, record(sid))
    wait_for(lambda: all(e['attempts'] >= 2 for e in entries(sink).values()) and len(entries(sink)) == 30,
             20, 'every entry tried twice against the dead port')
    assert 'cannot connect' in sink.status()['lastError']['error']
    ids_before = {e['speechID']: e['id'] for e in entries(sink).values()}
    # Up again; the first eight answers come too late, so those payloads arrive twice.
    late = []

    def behaviour(req, nth):
        if len(late) < 8 and nth == 1:
            late.append(req)
            return 200, {}, b'', 1.0
        return 200, {}, b'', 0
    rx = receivers(port=port, behaviour=behaviour)
    wait_for(lambda: rx.speech_ids() == set(sids) and not entries(sink), 30, 'every payload delivered')
    wait_for(lambda: sink.status()['pending'] == 0, 5, 'an empty outbox')
    by_id = rx.by_id()
    assert len(by_id) == 30                          # one webhook-id per task ...
    assert {json.loads(r[0]['body'])['speechID']: i for i, r in by_id.items()} == \
        {sid: i for sid, i in ids_before.items()}    # ... the one it had on disk before
    dups = [reqs for reqs in by_id.values() if len(reqs) > 1]
    assert len(dups) >= 8                            # the late ones came again, same id and body
    for reqs in dups:
        assert len({r['body'] for r in reqs}) == 1 and all(verify(r) for r in reqs)
    assert sink.status()['failed'] == 0 and sink.outbox.names(failed=True) == []


def test_no_entry_is_sent_twice_by_concurrent_senders(receivers, make_sink):
    # A rescan that finds a new file before the sink's wake-up, a retry rescheduled while
    # its sender still held it: either used to let two senders POST the same entry.
    rx = receivers()
    sink = make_sink(rx.url, concurrency=4, rescan=0.001)
    for i in range(200):
        sink.handle(FINAL, record('race-%03d' % i))
    wait_for(lambda: sink.status()['delivered'] >= 200 and sink.status()['pending'] == 0, 30, 'all delivered')
    sids = [b['speechID'] for b in rx.bodies()]
    assert len(sids) == 200 and len(set(sids)) == 200


def test_500s_are_retried_with_the_same_id_and_body(receivers, make_sink):
    rx = receivers(behaviour=lambda req, nth: (500, {}, b'database is down', 0) if nth <= 3 else (200, {}, b'', 0))
    sink = make_sink(rx.url)
    sink.handle(FINAL, record('five-1'))
    wait_for(lambda: sink.status()['delivered'] == 1, 10, 'delivery after three 500s')
    (reqs,) = rx.by_id().values()
    assert len(reqs) == 4 and len({r['body'] for r in reqs}) == 1 and all(verify(r) for r in reqs)
    assert sink.status()['lastError']['error'] == 'HTTP 500 Internal Server Error: database is down'
    assert sink.status()['attempts'] == 4 and entries(sink) == {}


def test_entry_keeps_attempts_and_last_error_between_tries(receivers, make_sink):
    rx = receivers(behaviour=lambda req, nth: (503, {}, b'', 0))
    sink = make_sink(rx.url, backoff_base=0.05, backoff_max=0.1)
    sink.handle(FINAL, record('keep-1'))
    entry = wait_for(lambda: (lambda e: e if e and e['attempts'] >= 3 else None)(entries(sink).get('keep-1')),
                     10, 'three attempts on disk')
    assert entry['last_status'] == 503 and entry['last_error'].startswith('HTTP 503')
    assert entry['next_at'] > entry['last_attempt'] and entry['payload']['speechID'] == 'keep-1'


def test_a_receiver_that_never_answers_times_out_and_is_retried(receivers, make_sink):
    rx = receivers(behaviour=lambda req, nth: (200, {}, b'', 30 if nth == 1 else 0))
    sink = make_sink(rx.url, read_timeout=0.3)
    sink.handle(FINAL, record('slow-1'))
    wait_for(lambda: sink.status()['delivered'] == 1, 10, 'delivery after a timeout')
    (reqs,) = rx.by_id().values()
    assert len(reqs) == 2 and reqs[0]['body'] == reqs[1]['body']
    assert 'timed out' in sink.status()['lastError']['error']


def test_a_slow_receiver_never_blocks_the_reporter(receivers, make_sink):
    rx = receivers(behaviour=lambda req, nth: (200, {}, b'', 30))   # holds every request
    sink = make_sink(rx.url, concurrency=2, read_timeout=30)
    for i in range(2):
        sink.handle(FINAL, record('held-%d' % i))
    wait_for(lambda: len(rx.requests) == 2, 10, 'both sender threads stuck in the receiver')
    done = threading.Event()

    def reporter():
        for i in range(50):
            sink.handle(FINAL, record('more-%02d' % i))
        done.set()
    threading.Thread(target=reporter, daemon=True).start()
    # The reporter's work is only the outbox files: it ends while both senders still wait.
    assert done.wait(20)
    assert len(rx.requests) == 2 and len(entries(sink)) == 52
    assert sink.status()['pending'] == 52 and sink.status()['inFlight'] == 2
    rx.release.set()
    wait_for(lambda: sink.status()['delivered'] == 52, 20, 'every entry after the receiver woke')


def test_a_redirect_is_not_followed(receivers, make_sink):
    elsewhere = receivers()
    rx = receivers(behaviour=lambda req, nth: (301, {'Location': elsewhere.url}, b'', 0))
    sink = make_sink(rx.url)
    sink.handle(FINAL, record('moved-1'))
    entry = wait_for(lambda: (lambda e: e if e and e['attempts'] >= 2 else None)(entries(sink).get('moved-1')),
                     10, 'two attempts')
    assert entry['last_status'] == 301
    assert entry['last_error'] == 'HTTP 301 Moved Permanently to %s (redirects are not followed)' % elsewhere.url
    assert elsewhere.requests == []
    assert sink.status()['delivered'] == 0 and sink.status()['pending'] == 1


def test_410_stops_retrying_that_entry(receivers, make_sink):
    rx = receivers(behaviour=lambda req, nth: (410, {}, b'', 0) if json.loads(req['body'])['speechID'] == 'gone-1'
                   else (200, {}, b'', 0))
    sink = make_sink(rx.url)
    sink.handle(FINAL, record('gone-1'))
    sink.handle(FINAL, record('kept-1'))
    wait_for(lambda: sink.status()['failed'] == 1 and sink.status()['delivered'] == 1, 10, '410 and 200')
    failed = entries(sink, failed=True)
    assert list(failed) == ['gone-1']
    assert failed['gone-1']['last_status'] == 410 and 'asked to stop' in failed['gone-1']['last_error']
    time.sleep(0.5)                                  # several backoffs long: nothing more may come
    assert sum(1 for b in rx.bodies() if b['speechID'] == 'gone-1') == 1
    assert entries(sink) == {}


def test_retry_after_is_honoured(receivers, make_sink):
    rx = receivers(behaviour=lambda req, nth: (503, {'Retry-After': '1'}, b'', 0) if nth == 1 else (200, {}, b'', 0))
    sink = make_sink(rx.url, backoff_base=0.01, backoff_max=5)
    sink.handle(FINAL, record('later-1'))
    wait_for(lambda: sink.status()['delivered'] == 1, 10, 'delivery after Retry-After')
    first, second = rx.requests
    # Without the header the retry would come after at most 10 ms.
    assert second['time'] - first['time'] >= 0.95


def test_retry_after_parsing_and_backoff():
    now = 1_700_000_000.0
    assert _webhook.parse_retry_after('120') == 120.0
    date = time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(now + 30))
    assert abs(_webhook.parse_retry_after(date, now=now) - 30) < 1e-6
    assert _webhook.parse_retry_after('Wed, 21 Oct 2015 07:28:00 GMT', now=now) == 0.0
    assert _webhook.parse_retry_after('soon') is None and _webhook.parse_retry_after(None) is None
    s = settings('http://x', backoff_base=5, backoff_max=60)
    assert [_webhook.backoff(s, n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6, 50)] == [5, 10, 20, 40, 60, 60, 60]
    assert [_webhook.backoff(s, n, rand=lambda: 0.0) for n in (1, 2, 3)] == [2.5, 5, 10]


def run_cli(capsys, ini, *args):
    """svcmgr.py webhook ... in this process: (exit status, stdout)."""
    import svcmgr
    try:
        code = svcmgr.main(['-c', str(ini), 'webhook'] + list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().out


def test_give_up_after_max_attempts_then_cli_list_and_redeliver(receivers, make_sink, tmp_path, capsys):
    state = {'up': False}
    rx = receivers(behaviour=lambda req, nth: (200, {}, b'', 0) if state['up'] else (500, {}, b'no', 0))
    sink = make_sink(rx.url, max_attempts=2)
    sink.handle(FINAL, record('park-1'))
    sink.handle(FINAL, record('park-2'))
    wait_for(lambda: sink.status()['failed'] == 2, 10, 'both given up')
    assert len(rx.requests) == 4 and entries(sink) == {}
    ini = tmp_path / 'app.ini'                       # records/ is beside it, as in a real install
    ini.write_text('[webhook]\nurl = %s\n' % rx.url)
    code, out = run_cli(capsys, ini, 'list', '--json')
    rows = json.loads(out)
    assert sorted((r['status'], r['speechID'], r['attempts']) for r in rows) == \
        [('failed', 'park-1', 2), ('failed', 'park-2', 2)]
    assert all('HTTP 500' in r['last_error'] and 'max_attempts (2) reached' in r['last_error'] for r in rows)
    code, out = run_cli(capsys, ini, 'list')
    assert code == 0 and '0 pending, 2 failed' in out and 'park-1' in out
    state['up'] = True
    code, out = run_cli(capsys, ini, 'redeliver', 'park-1')
    assert code == 0 and 'back in the outbox' in out
    wait_for(lambda: sink.status()['delivered'] == 1, 10, 'the redelivered entry (picked up by a rescan)')
    assert run_cli(capsys, ini, 'redeliver', '--all-failed')[0] == 0
    wait_for(lambda: sink.status()['delivered'] == 2 and sink.status()['failed'] == 0, 10, 'all redelivered')
    by_id = rx.by_id()
    assert len(by_id) == 2 and all(len(reqs) == 3 for reqs in by_id.values())   # same id: 2 x 500, then 200
    assert run_cli(capsys, ini, 'redeliver', 'nosuch')[0] == 1
    assert run_cli(capsys, ini, 'redeliver')[0] == 2
    assert run_cli(capsys, ini, 'redeliver', 'park-1', '--all-failed')[0] == 2
    assert json.loads(run_cli(capsys, ini, 'list', '--json')[1]) == []


def test_outbox_is_drained_at_start_including_1_0_leftovers(receivers, tmp_path):
    rx = receivers()
    box = Outbox(str(tmp_path / 'webhook'))
    names = [box.add(box.new_entry('left-%d' % i, {'speechID': 'left-%d' % i, 'n': i})) for i in range(3)]
    assert names == ['left-0', 'left-1', 'left-2']
    with open(os.path.join(box.folder, '20210125_112014_082971'), 'w') as f:   # as 1.0 wrote it
        json.dump({'speechID': '20210125_112014_082971', 'transcript': '고기고기', 'result': '0'}, f)
    sink = WebhookSink(settings(rx.url), box)       # a fresh start: nothing woken, only the disk
    sink.start()
    try:
        wait_for(lambda: sink.status()['delivered'] == 4, 10, 'the drain')
    finally:
        sink.close()
    assert rx.speech_ids() == {'left-0', 'left-1', 'left-2', '20210125_112014_082971'}
    legacy = next(b for b in rx.bodies() if b['speechID'] == '20210125_112014_082971')
    assert legacy == {'speechID': '20210125_112014_082971', 'transcript': '고기고기', 'result': '0'}
    assert box.names() == [] and box.names(failed=True) == []


def test_same_speech_id_twice_keeps_both_and_a_folder_name_is_no_clash(tmp_path):
    box = Outbox(str(tmp_path / 'webhook'))
    assert box.add(box.new_entry('dup', {'n': 1})) == 'dup'
    assert box.add(box.new_entry('dup', {'n': 2})) == 'dup~1'
    assert box.add(box.new_entry('failed', {'n': 3})) == 'failed~1'   # failed/ is the folder
    assert [box.read(n)['payload']['n'] for n in ('dup', 'dup~1', 'failed~1')] == [1, 2, 3]
    # Writes are atomic: no temp file is left behind.
    assert sorted(os.listdir(box.folder)) == ['dup', 'dup~1', 'failed', 'failed~1']


# ------------------------------------------------------------------ hostile names

HOSTILE = ['../escape', '../../etc/passwd', '/tmp/abs', 'a/b', '..', '.', '', '.hidden', 'x' * 65,
           'nul\x00byte', 'back\\slash', 'new\nline', 'failed/../../up', '~1', 'a~b']


@pytest.mark.parametrize('sid', HOSTILE)
def test_a_hostile_speech_id_cannot_write_outside_the_outbox(tmp_path, sid):
    base = tmp_path / 'base'
    box = Outbox(str(base / 'records' / 'webhook'))
    box.ensure()
    with pytest.raises(ValueError):
        box.new_entry(sid, {})
    with pytest.raises(ValueError):
        box.path(sid)
    # Through the sink as well: refused and logged, nothing written anywhere.
    sink = WebhookSink(settings('http://127.0.0.1:9/'), box)
    sink.handle(FINAL, record(sid))
    found = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert found == []


def test_a_planted_symlink_is_neither_followed_nor_overwritten(tmp_path):
    box = Outbox(str(tmp_path / 'webhook'))
    box.ensure()
    outside = tmp_path / 'outside.txt'
    outside.write_text('precious')
    os.symlink(str(outside), os.path.join(box.folder, 'victim'))
    assert box.add(box.new_entry('victim', {'n': 1})) == 'victim~1'
    assert outside.read_text() == 'precious'
    with pytest.raises(_webhook.EntryError):
        box.read('victim')                            # O_NOFOLLOW
    assert box.names() == ['victim~1']               # the link is not an entry


def test_cli_refuses_hostile_names(tmp_path, capsys):
    ini = tmp_path / 'app.ini'
    ini.write_text('[webhook]\nurl = http://127.0.0.1:9/\n')
    code, out = run_cli(capsys, ini, 'redeliver', '../../etc/passwd')
    assert code == 1 and 'not a valid speechID' in out


# ------------------------------------------------------------------ end to end with the daemon

def webhook_ini(url, **kw):
    opts = dict(url=url, secret=SECRET, connect_timeout_secs=1, read_timeout_secs=2, backoff_base_secs=0.1,
                backoff_max_secs=0.5, rescan_secs=0.3)
    opts.update(kw)
    return '[webhook]\n' + ''.join('%s = %s\n' % kv for kv in opts.items())


def outbox_entries(d):
    box = Outbox(os.path.join(d.base, 'records', 'webhook'))
    return {name: box.read(name) for name in box.names()}


def test_daemon_delivers_signed_payloads_and_monitor_shows_the_outbox(make_daemon, receivers):
    rx = receivers()
    d = make_daemon(workers=2)
    d.write_ini(webhook_ini(rx.url))
    d.start()
    assert monitor(d)['outbox'] == {'enabled': True, 'pending': 0, 'inFlight': 0, 'failed': 0, 'delivered': 0,
                                    'attempts': 0, 'lastDelivery': None, 'lastError': None}
    c = d.client()
    folder, a = d.fixture('en_hello.wav')
    _, b = d.fixture('en_morning.wav')
    c.send(1002, transcribe_req(folder, a, sid='e2e-hello', customerId='c-1'))
    c.send(1002, transcribe_req(folder, b, sid='e2e-morning'))
    c.send(1002, transcribe_req(folder, 'missing.wav', sid='e2e-missing'))
    # The protocol refuses a hostile speechID before any file is named after it.
    c.send(1002, transcribe_req(folder, a, sid='../../../escape'))
    answers = c.recv_n(4, timeout=120)
    assert sorted(body['result'] for _, body in answers) == ['0', '0', '4', '7']
    wait_for(lambda: rx.speech_ids() == {'e2e-hello', 'e2e-morning', 'e2e-missing'}, 30, 'three deliveries')
    assert len(rx.requests) == 3
    assert all(verify(r) for r in rx.requests)
    got = {body['speechID']: body for body in rx.bodies()}
    hello = got['e2e-hello']
    assert hello['result'] == '0' and hello['state'] == 'DONE' and hello['transcript'] == TEXTS['en_hello.wav']
    assert hello['customerId'] == 'c-1' and hello['sttKey'] == 'e2e-hello' and hello['key'] == a
    assert hello['regDate'] == time.strftime('%Y%m%d') and hello['callTime'] == hello['duration'] > 0.5
    assert hello['segments'][0]['result'] == TEXTS['en_hello.wav'] and hello['segments'][0]['channel'] == 'A'
    # The utterance's own times (en_hello.wav's speech is 0.2 s to 2.3 s), not the whole call.
    assert 0.1 < hello['segments'][0]['start'] < 0.35 and 2.2 < hello['segments'][0]['end'] < 2.4
    assert len(hello['segments']) == 1 and 0 < hello['confidence'] <= 1
    assert hello['audioPath'] == os.path.join(d.base, 'batch', 'rec_mp3', time.strftime('%Y%m%d'))
    assert [m.split(' < ')[1] for m in hello['processInterval']][-1] == 'TRANSCRIBE_END'
    assert got['e2e-missing']['result'] == '4' and got['e2e-missing']['state'] == 'NOFILE_ID'
    box = wait_for(lambda: (lambda o: o if o['delivered'] == 3 else None)(monitor(d)['outbox']), 10, 'delivered 3')
    assert box['pending'] == 0 and box['failed'] == 0 and box['lastError'] is None
    assert outbox_entries(d) == {}
    assert not os.path.exists(os.path.join(d.base, 'escape')) and not os.path.exists('/tmp/escape')
    assert 'webhook speechID=e2e-hello: delivered' in d.log_text()


def test_daemon_sigkilled_with_a_full_outbox_delivers_all_after_restart(make_daemon, receivers):
    port = free_port()                               # the receiver is down at first
    d = make_daemon(workers=2)
    d.write_ini(webhook_ini('http://127.0.0.1:%d/hook' % port))
    d.start()
    c = d.client()
    sids = ['kill-%d' % i for i in range(4)]
    for sid, name in zip(sids, ['en_hello.wav', 'en_morning.wav', 'en_cancel.wav', 'en_payment.wav']):
        folder, fname = d.fixture(name)
        c.send(1002, transcribe_req(folder, fname, sid=sid))
    assert all(body['result'] == '0' for _, body in c.recv_n(4, timeout=120))
    stored = wait_for(lambda: (lambda e: e if len(e) == 4 and all(x['attempts'] >= 1 for x in e.values())
                               else None)(outbox_entries(d)), 30, 'four entries tried and kept')
    ids = {e['speechID']: e['id'] for e in stored.values()}
    out = monitor(d)['outbox']
    assert out['pending'] == 4 and 'cannot connect' in out['lastError']['error']
    r = d.cli('webhook', 'list')
    assert r.returncode == 0 and '4 pending, 0 failed' in r.stdout
    procs = d.processes()
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    assert len(outbox_entries(d)) == 4
    rx = receivers(port=port)
    d.start()
    wait_for(lambda: rx.speech_ids() == set(sids), 30, 'every entry delivered after the restart')
    assert {b['speechID']: r['headers']['webhook-id'] for b, r in zip(rx.bodies(), rx.requests)} == ids
    assert all(verify(r) for r in rx.requests)
    wait_for(lambda: outbox_entries(d) == {}, 10, 'an empty outbox')
    assert monitor(d)['outbox']['delivered'] == 4


def test_daemon_gives_up_then_redeliver_cli_reaches_the_running_daemon(make_daemon, receivers):
    state = {'up': False}
    rx = receivers(behaviour=lambda req, nth: (200, {}, b'', 0) if state['up'] else (500, {}, b'broken', 0))
    d = make_daemon(workers=1)
    d.write_ini(webhook_ini(rx.url, max_attempts=2))
    d.start()
    c = d.client()
    folder, name = d.fixture('en_hello.wav')
    c.send(1002, transcribe_req(folder, name, sid='park-e2e'))
    assert c.recv(120)[1]['result'] == '0'
    out = wait_for(lambda: (lambda o: o if o['failed'] == 1 else None)(monitor(d)['outbox']), 20, 'given up')
    assert out['pending'] == 0 and out['lastError']['speechID'] == 'park-e2e'
    assert out['lastError']['error'] == 'HTTP 500 Internal Server Error: broken'
    rows = json.loads(d.cli('webhook', 'list', '--json').stdout)
    assert [(r['status'], r['speechID'], r['attempts']) for r in rows] == [('failed', 'park-e2e', 2)]
    state['up'] = True
    r = d.cli('webhook', 'redeliver', 'park-e2e')
    assert r.returncode == 0, r.stdout + r.stderr
    out = wait_for(lambda: (lambda o: o if o['delivered'] == 1 else None)(monitor(d)['outbox']), 20, 'redelivered')
    assert out['failed'] == 0 and out['pending'] == 0
    assert len(rx.by_id()) == 1 and len(rx.requests) == 3
