"""A record that was not written is not a record, and what svcmgr writes is strict JSON:
the real daemon with its records folder on a small tmpfs that fills up (a scanned file
stays, tasks are refused with 3, everything recovers by itself), a torn last line, the
records folder removed while running, deeply nested bodies and NaN/Infinity in requests.

Run against another checkout's daemon with SVCMGR_TEST_DAEMON_ROOT=/path (conftest)."""
import errno
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import FIXTURES, expected_texts, transcribe_req, wait_for
from helpers import db_section, monitor, rows

TEXTS = expected_texts()


# ------------------------------------------------------------------ helpers

def strict_loads(text):
    """json.loads that refuses NaN, Infinity and numbers out of range, as strict readers do."""
    def bad_constant(name):
        raise ValueError('not JSON: %s' % name)

    def bad_float(text):
        value = float(text)
        if value in (float('inf'), float('-inf')):
            raise ValueError('not JSON: %s' % text)
        return value
    return json.loads(text, parse_constant=bad_constant, parse_float=bad_float)


def record_lines(d):
    """(records parsed strictly, lines that are not a record) of every records/*.json file."""
    good, bad = [], []
    folder = os.path.join(d.base, 'records')
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if not name.endswith('.json'):
            continue
        with open(os.path.join(folder, name), 'rb') as f:
            data = f.read()
        for line in data.split(b'\n'):
            if not line.strip():
                continue
            try:
                good.append(strict_loads(line.decode('utf-8')))
            except ValueError:
                bad.append(line)
    return good, bad


def records_of(d, sid):
    return [r for r in record_lines(d)[0] if r['data']['speechID'] == sid]


def scanning(make_daemon, extra='', **opts):
    """A daemon with the scanner on, a pass every 0.3 s."""
    d = make_daemon(**opts)
    with open(d.ini) as f:
        text = f.read()
    text = text.replace('scan_enabled = false', 'scan_enabled = true\n' + extra) \
        .replace('scan_interval_secs = 1\n', 'scan_interval_secs = 0.3\n')
    with open(d.ini, 'w') as f:
        f.write(text)
    return d


def add_ini(d, text):
    with open(d.ini, 'a') as f:
        f.write(text)


def drop(d, fixture, name):
    """Copy a fixture into the drop folder the way a recorder should: written aside, renamed in."""
    os.makedirs(d.batch, exist_ok=True)
    tmp = os.path.join(d.batch, name + '.part')
    shutil.copy(os.path.join(FIXTURES, fixture), tmp)
    os.rename(tmp, os.path.join(d.batch, name))
    return os.path.join(d.batch, name)


def claimed(d):
    out = []
    for folder, _, files in os.walk(d.batch):
        if os.path.basename(folder) == '.processing':
            out += files
    return sorted(out)


def ask(d, req, timeout=120):
    c = d.client()
    try:
        c.send(1002, req)
        return c.recv(timeout)[1]
    finally:
        c.close()


def fill(folder):
    """Fill the filesystem of `folder` to the last byte; returns the filler's path."""
    path = os.path.join(folder, 'filler')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 4096, 1):
            chunk = b'\0' * size
            while True:
                try:
                    if os.write(fd, chunk) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return path


@pytest.fixture
def tmpfs():
    """mount(path, size): a small tmpfs over `path` (we run as root); unmounted at the end,
    after the daemons (requested before make_daemon, so torn down after it)."""
    mounted = []

    def mount(path, size):
        os.makedirs(path, exist_ok=True)
        subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%s,mode=0755' % size, 'tmpfs', path], check=True)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        if subprocess.run(['umount', path]).returncode != 0:
            subprocess.run(['umount', '-l', path], check=True)


class Receiver:
    """A webhook receiver that, like a strict one, answers 400 to a body that is not strict JSON."""

    def __init__(self):
        self.bodies, self.refused = [], []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                try:
                    receiver.bodies.append(strict_loads(raw.decode('utf-8')))
                    status = 200
                except ValueError:
                    receiver.refused.append(raw)
                    status = 400
                self.send_response(status)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.url = 'http://127.0.0.1:%d/hook' % self.server.server_port
        threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()

    def ids(self):
        return [b['speechID'] for b in list(self.bodies)]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def webhook_ini(url):
    return ('[webhook]\nurl = %s\nconnect_timeout_secs = 1\nread_timeout_secs = 2\nbackoff_base_secs = 0.1\n'
            'backoff_max_secs = 0.5\nrescan_secs = 0.3\n' % url)


# ------------------------------------------------------------------ 1. a record that was not written

def readyz(d):
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d/readyz' % d.http_port, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_full_records_disk_keeps_the_scanned_file_refuses_tasks_and_recovers(tmpfs, make_daemon, receiver):
    d = scanning(make_daemon, source_after='delete', http='true')
    add_ini(d, webhook_ini(receiver.url))
    records = tmpfs(os.path.join(d.base, 'records'), '1m')
    d.start()
    filler = fill(records)
    path = drop(d, 'en_hello.wav', 'call-full.wav')
    wait_for(lambda: 'could not write the usage record of speechID=' in d.log_text(), 60,
             'the failed record in the log')
    # The recording is not gone: it stays claimed until its record is on disk.
    assert not os.path.exists(path)
    names = claimed(d)
    assert len(names) == 1 and names[0].endswith('__call-full.wav'), names
    sid = names[0].split('__')[0]
    # While records cannot be written, no task is taken: result 3 with a reason, in Monitor and the log.
    folder, name = d.fixture('en_morning.wav')
    answer = ask(d, transcribe_req(folder, name, sid='refused-1'))
    assert answer['result'] == '3' and 'records cannot be written' in answer['message'], answer
    status = monitor(d)['records']
    assert status['ok'] is False and status['unwritten'] == 1 and 'No space left' in status['error'], status
    assert 'records: cannot be written' in d.log_text()
    code, body = readyz(d)
    assert code == 503 and any('usage records cannot be written' in p for p in body['problems']), body
    assert receiver.ids() == [] and claimed(d) == names
    # Space returns: the record, the outbox entry, the scanned file's move and new tasks follow by themselves.
    os.unlink(filler)
    freed = time.monotonic()
    wait_for(lambda: records_of(d, sid), 30, 'the held record written')
    written = time.monotonic() - freed
    wait_for(lambda: not claimed(d), 30, 'the scanned file moved out after its record')
    wait_for(lambda: sid in receiver.ids(), 30, 'the webhook of the held record delivered')
    print('figure: held record on disk %.2f s, file moved out and webhook delivered %.2f s after space returned'
          % (written, time.monotonic() - freed))
    assert monitor(d)['records']['ok'] is True
    wait_for(lambda: readyz(d)[0] == 200, 30, '/readyz ready again')
    answer = ask(d, transcribe_req(folder, name, sid='after-1'))
    assert answer['result'] == '0' and answer['transcript'] == TEXTS['en_morning.wav']
    wait_for(lambda: records_of(d, 'after-1'), 30, 'the next record')
    good, bad = record_lines(d)
    assert bad == [] and sorted(r['data']['speechID'] for r in good) == sorted([sid, 'after-1'])
    assert [r['data']['result'] for r in records_of(d, sid)] == ['0']
    assert 'refused-1' not in receiver.ids() and receiver.refused == []
    assert 'written again after' in d.log_text()


def pad_line(sid, size):
    """A records line of exactly `size` bytes (newline included) for a task that is not ours."""
    line = {'data': {'speechID': sid, 'transcript': '', 'result': '0'}, 'state': 'DONE', 'source': 'client',
            'startTime': '2026.01.01 00:00:00.000000', 'endTime': '2026.01.01 00:00:01.000000',
            'processInterval': [], 'request': {}, 'pad': ''}
    base = len(json.dumps(line, separators=(', ', ': ')).encode()) + 1
    line['pad'] = 'x' * (size - base)
    text = json.dumps(line, separators=(', ', ': ')) + '\n'
    assert len(text.encode()) == size
    return text.encode()


def test_a_write_cut_short_by_a_full_disk_leaves_no_torn_line(tmpfs, make_daemon):
    d = make_daemon()
    records = tmpfs(os.path.join(d.base, 'records'), '256k')
    # Today's file ends 60 bytes before a page boundary: a full tmpfs takes 60 bytes of a line, then refuses.
    day_file = os.path.join(records, time.strftime('%Y%m%d') + '.json')
    with open(day_file, 'wb') as f:
        f.write(pad_line('pad-1', 4096 - 60))
    d.start()
    filler = fill(records)
    folder, name = d.fixture('en_hello.wav')
    assert ask(d, transcribe_req(folder, name, sid='torn-1'))['result'] == '0'
    wait_for(lambda: 'could not write the usage record of speechID=torn-1' in d.log_text(), 30, 'the failure logged')
    with open(day_file, 'rb') as f:
        assert f.read().endswith(b'\n'), 'a torn line was left at the end of the records file'
    os.unlink(filler)
    wait_for(lambda: records_of(d, 'torn-1') or record_lines(d)[1], 30, 'the held record written')
    good, bad = record_lines(d)
    assert bad == [], 'lines that are not records: %r' % bad
    assert [r['data']['speechID'] for r in good] == ['pad-1', 'torn-1']


def test_a_torn_line_from_before_never_hides_a_record_so_nothing_runs_twice(make_daemon):
    # A scanned file whose move out fails stays claimed after its record is written; at the
    # next start the scanner must find that record even though the file began with a torn line.
    d = scanning(make_daemon, source_after='keep', extra='scan_done_path = done\n')
    blocker = os.path.join(d.base, 'done')
    records = os.path.join(d.base, 'records')
    os.makedirs(records, exist_ok=True)
    with open(os.path.join(records, time.strftime('%Y%m%d') + '.json'), 'wb') as f:
        f.write(pad_line('pad-2', 500) + b'{"data": {"speechID": "cut-short", "transcr')
    d.start()
    # start refuses a file where a folder belongs, so the done folder turns into one after it.
    shutil.rmtree(blocker, ignore_errors=True)
    with open(blocker, 'w') as f:
        f.write('a file where the done folder should be')
    drop(d, 'en_hello.wav', 'call-once.wav')
    wait_for(lambda: 'cannot move' in d.log_text(), 60, 'the failed move out')
    assert len(claimed(d)) == 1
    d.stop()
    os.unlink(blocker)
    d.start()
    wait_for(lambda: not claimed(d), 60, 'the claimed file moved out')
    wait_for(lambda: os.path.exists(os.path.join(blocker, 'call-once.wav')), 30, 'the file in done/')
    with open(os.path.join(records, time.strftime('%Y%m%d') + '.json'), 'rb') as f:
        runs = f.read().count(b'"fileName": "call-once.wav"')
    assert runs == 1, 'call-once.wav ran %d times' % runs
    good, bad = record_lines(d)
    assert bad == [], 'lines that are not records: %r' % bad
    assert 'already recorded' in d.log_text()


def test_records_folder_removed_while_running_is_made_again(make_daemon, receiver):
    d = make_daemon()
    add_ini(d, webhook_ini(receiver.url))
    d.start()
    folder, name = d.fixture('en_hello.wav')
    assert ask(d, transcribe_req(folder, name, sid='before-rm'))['result'] == '0'
    wait_for(lambda: records_of(d, 'before-rm'), 30, 'the first record')
    shutil.rmtree(os.path.join(d.base, 'records'))
    assert ask(d, transcribe_req(folder, name, sid='after-rm'))['result'] == '0'
    wait_for(lambda: records_of(d, 'after-rm'), 30, 'the record after rm -rf records')
    wait_for(lambda: 'after-rm' in receiver.ids(), 30, 'the webhook after rm -rf records')
    assert 'was removed or replaced; making it again' in d.log_text()


# ------------------------------------------------------------------ 3. bad bodies get 7, strict JSON out

def raw_frames(c, n, timeout=120):
    """n frames as (type, raw body bytes) from a conftest Client."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        while not c.frames:
            c.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = c.sock.recv(1 << 16)
            if not data:
                raise ConnectionError('connection closed by the daemon after %d frame(s)' % len(out))
            c.frames.extend(c.decoder.feed(data))
        out.append(c.frames.pop(0))
    return out


@pytest.mark.parametrize('depth', [65, 500, 900, 980, 990, 1000, 3000, 100000])
def test_a_deeply_nested_body_gets_7_and_the_connection_lives_on(daemon, depth):
    folder, name = daemon.fixture('en_hello.wav')
    c = daemon.client()
    c.send(1002, transcribe_req(folder, name, sid='real-%d' % depth))
    deep = '[' * depth + ']' * depth
    body = '{"speechID": "deep-%d", "filePath": "%s", "fileID": "missing.wav", "extra": %s}' % (depth, folder, deep)
    c.send(1002, body.encode())
    frames = raw_frames(c, 2)
    answers = {}
    for ptype, raw in frames:
        assert ptype == 2002
        body = strict_loads(raw.decode('utf-8'))
        answers[body.get('speechID')] = body
    # Its speechID is echoed, however deep: with several requests in flight the client must tell them apart.
    deep_answer = answers['deep-%d' % depth]
    assert deep_answer['result'] == '7' and 'nested' in deep_answer['message'], deep_answer
    assert answers['real-%d' % depth]['result'] == '0'
    c.send(1003, {'type': 'task'})
    assert c.recv(10)[0] == 2003
    c.close()


@pytest.mark.parametrize('number', ['NaN', 'Infinity', '-Infinity', '1e999', '-1e999'])
def test_nan_and_infinity_in_a_request_are_refused_with_7(make_daemon, receiver, dbname, number):
    d = make_daemon()
    add_ini(d, webhook_ini(receiver.url) + db_section(dbname))
    d.cli('db', 'init', check=True)
    d.start()
    folder, name = d.fixture('en_hello.wav')
    c = d.client()
    for field in ('score', 'domainCode'):
        body = '{"speechID": "nan-%s", "filePath": "%s", "fileID": "%s", "%s": %s}' % (field, folder, name, field, number)
        c.send(1002, body.encode())
    c.send(1002, transcribe_req(folder, name, sid='fine', score=1.5, deep={'a': [1, 2.5e3]}))
    answers = {}
    for ptype, raw in raw_frames(c, 3):
        body = strict_loads(raw.decode('utf-8'))      # every answer is strict JSON
        answers[body['speechID']] = body
    c.close()
    for field in ('score', 'domainCode'):
        a = answers['nan-%s' % field]
        assert a['result'] == '7' and number.lstrip('-') in a['message'], a
    assert answers['fine']['result'] == '0'
    wait_for(lambda: records_of(d, 'fine'), 30, 'the record')
    wait_for(lambda: 'fine' in receiver.ids(), 30, 'the webhook')
    good, bad = record_lines(d)
    assert bad == [] and [r['data']['speechID'] for r in good] == ['fine']
    assert good[0]['request']['score'] == 1.5
    assert receiver.refused == [] and receiver.ids() == ['fine']
    # The database holds the one task, its JSON columns strict.
    row = wait_for(lambda: rows(dbname).get('fine') if rows(dbname).get('fine', {}).get('state') == 'DONE' else None,
                   30, 'the final row')
    assert sorted(rows(dbname)) == ['fine']
    for column in ('request', 'timings', 'channel_transcripts'):
        strict_loads(row[column])
    assert strict_loads(row['request'])['score'] == 1.5


# ------------------------------------------------------------------ the reporter's order, without a daemon

class FlakySink:
    """A sink with commit(): refuses (Unwritten) while `down`, and takes back what it held uncommitted."""

    def __init__(self):
        import _records
        self.Unwritten = _records.Unwritten
        self.down, self.pending, self.durable = False, [], []

    def handle(self, event, record):
        if event != 'final':
            return
        if self.down:
            self.pending = []
            raise self.Unwritten('disk full')
        self.pending.append(record.speech_id)

    def commit(self):
        if self.down:
            self.pending = []
            raise self.Unwritten('disk full')
        self.durable += self.pending
        self.pending = []


class Downstream:
    def __init__(self, first):
        self.first, self.seen, self.early = first, [], []

    def handle(self, event, record):
        if event == 'final':
            if record.speech_id not in self.first.durable:
                self.early.append(record.speech_id)
            self.seen.append(record.speech_id)


def test_the_reporter_passes_a_record_on_only_once_it_is_durable_and_in_order():
    import _records
    from _states import Result, Source, State

    def rec(i):
        return _records.TaskRecord('r%03d' % i, Source.SCANNER, State.DONE, Result.OK, 0.0, 1.0, [], {})
    first = FlakySink()
    down = Downstream(first)
    reporter = _records.Reporter([first, down])
    reporter.RETRY_SECS = 0.05
    reporter.start()
    for i in range(20):
        reporter.submit(_records.FINAL, rec(i))
    wait_for(lambda: len(down.seen) == 20, 10, 'the first 20')
    first.down = True
    for i in range(20, 60):
        reporter.submit(_records.FINAL, rec(i))
    wait_for(lambda: reporter.blocked(), 10, 'the reporter blocked')
    assert reporter.status()['ok'] is False and len(down.seen) == 20
    first.down = False
    wait_for(lambda: len(down.seen) == 60, 10, 'the held records')
    reporter.stop()
    ids = ['r%03d' % i for i in range(60)]
    assert first.durable == ids and down.seen == ids and down.early == []
    assert reporter.blocked() is None and reporter.written == 60
