"""MySQL persistence (_db.py) against the real MariaDB of this machine: the spool on its own,
the writer's upserts and guards, `svcmgr.py db init/check`, and the real daemon writing task
and node-status rows through outages made for real (a TCP proxy cut or hung, a killed
connection, a locked table). Each test runs in its own database, dropped at the end; when
MariaDB cannot be reached the tests fail, they never skip."""
import datetime
import json
import os
import shutil
import threading
import time

import pytest

import _config
import _db
import _records
from conftest import FIXTURES, expected_texts, transcribe_req, wait_for
from helpers import PORT, Proxy, db_section, monitor, query, rows, server_connection

TEXTS = expected_texts()


def load_cfg(tmp_path, name, port=PORT, extra=''):
    ini = tmp_path / 'app.ini'
    ini.write_text('[server]\nport = 9123\nserver_seq = 7\n' + db_section(name, port, extra=extra))
    return _config.load(str(ini))


def init_schema(tmp_path, name, port=PORT):
    _db.init(load_cfg(tmp_path, name, port), out=lambda *a: None)


def db_daemon(make_daemon, name, port=PORT, **opts):
    """A daemon writing to database `name` (through `port`); `db init` run by its own CLI."""
    d = make_daemon(**opts)
    d.write_ini(db_section(name, port))
    d.cli('db', 'init', check=True)
    return d


@pytest.fixture
def proxy():
    p = Proxy()
    yield p
    p.close()


# ------------------------------------------------------------------ events as the master makes them

def accepted(sid, t, **request):
    req = {'filePath': '/data/in', 'fileID': sid + '.wav', 'fileName': sid + '.wav', 'domainName': 'SGDefault',
           'domainCode': 'SG0001'}
    req.update(request)
    return (_records.ACCEPTED, {'speechID': sid, 'source': 'client', 'state': 'INIT',
                                'startTime': _records.stamp(t), 'created': t, 'request': req,
                                'audioPath': '/data/out'})


def state(sid, new, at, worker=1):
    return (_records.STATE, {'speechID': sid, 'state': new, 'worker': worker, 'at': at})


def segments_of(transcript, n):
    """n segments of a task, each with the transcript's words and confidences."""
    out = []
    for i in range(n):
        words = [{'word': word, 'start': 2.0 * i + 0.1 * k, 'end': 2.0 * i + 0.1 * k + 0.08, 'confidence': 0.5}
                 for k, word in enumerate(transcript.split())]
        out.append({'seq': i + 1, 'channel': 'AB'[i % 2], 'start': 2.0 * i, 'end': 2.0 * i + 1.5,
                    'text': transcript, 'confidence': 0.5 + i / 100, 'lowConfidence': i == 0, 'words': words})
    return out


def final(sid, t, transcript='hello', result='0', st='DONE', segments=None, **request):
    return (_records.FINAL, _records.TaskRecord.from_line({
        'segments': segments,
        'data': {'speechID': sid, 'transcript': transcript, 'result': result}, 'socket': 5, 'state': st,
        'startTime': _records.stamp(t), 'endTime': _records.stamp(t + 1.5),
        'processInterval': ['0.000000 < TRANSCRIBE_START', '0.000100 < WORKER_PUT', '0.000300 < WORKER_GET',
                            '1.400000 < TRANSCRIBE_END'],
        'source': 'client', 'worker': 1, 'duration': 2.25,
        'request': dict({'filePath': '/data/in', 'fileID': sid + '.wav', 'fileName': sid + '.wav'}, **request),
        'channels': [{'channel': 'A', 'transcript': transcript}], 'audioWAV': sid + '.wav'}))


def task_events(sid, t, transcript='hello', segments=None):
    return [accepted(sid, t), state(sid, 'CONVERT', t + 0.1), state(sid, 'RECOGNIZE', t + 0.5),
            final(sid, t, transcript, segments=segments)]


def segment_rows(name):
    return query(name, 'SELECT s.*, t.speech_id AS task_sid FROM task_segment s JOIN task t ON t.id = s.task_id'
                       ' ORDER BY s.speech_id, s.seq')


def spool_event(sink, ev):
    event, payload = ev
    if event == _records.FINAL:
        payload = payload.to_dict()
    return {'event': event, 'node': sink.node, 'serverSeq': sink.server_seq, 'payload': payload}


def wait_idle(sink, timeout=30):
    wait_for(lambda: sink.q.qsize() == 0 and not len(sink.spool) and sink.conn is not None, timeout,
             'the db writer to catch up')
    time.sleep(0.2)      # the last statement in hand


# ------------------------------------------------------------------ the spool alone (no database)

def test_spool_appends_fsyncs_replays_in_order_and_clears_only_when_done(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(fd), real_fsync(fd)))
    spool = _db.Spool(str(tmp_path / 'records' / 'db-spool.jsonl'))
    assert len(spool) == 0 and list(spool.read()) == []
    spool.append([{'n': 1}, {'n': 2, 'text': '한국어 \'"\\'}])
    spool.append([{'n': 3}])
    assert len(synced) == 2 and len(spool) == 3
    got = list(spool.read())
    assert [ev for ev, _, _ in got] == [{'n': 1}, {'n': 2, 'text': '한국어 \'"\\'}, {'n': 3}]
    spool.advance(got[0][2])
    assert [ev['n'] for ev, _, _ in spool.read()] == [2, 3]      # resumes after what was applied
    spool.advance(got[1][2])
    spool.append([{'n': 4}])                                       # arrived meanwhile
    spool.advance(got[2][2])
    assert not spool.clear() and os.path.exists(spool.path)        # line 4 not replayed yet
    rest = list(spool.read())
    assert [ev['n'] for ev, _, _ in rest] == [4]
    spool.advance(rest[0][2])
    assert spool.clear() and not os.path.exists(spool.path) and len(spool) == 0
    # A new Spool on the same file counts what an earlier run left.
    spool.append([{'n': 5}, {'n': 6}])
    assert len(_db.Spool(spool.path)) == 2 and _db.spool_count(str(tmp_path / 'records')) == 2


def test_spool_torn_last_line_is_moved_aside_and_unreadable_lines_are_reported(tmp_path):
    path = tmp_path / 'db-spool.jsonl'
    path.write_bytes(b'{"n": 1}\nnot json\n{"n": 3}\n{"n": 4, "trunc')
    spool = _db.Spool(str(path), str(tmp_path / 'db-rejected.jsonl'))
    assert path.read_bytes() == b'{"n": 1}\nnot json\n{"n": 3}\n'
    assert len(spool) == 3
    assert [ev for ev, _, _ in spool.read()] == [{'n': 1}, None, {'n': 3}]
    assert 'torn spool line' in (tmp_path / 'db-rejected.jsonl').read_text()


def test_schema_file_declares_every_column_the_writer_uses():
    tables = _db.schema_columns()
    assert set(tables) == {'task', 'node_status', 'task_segment', 'cluster_task', 'cluster_node'}
    assert set(_db.ACCEPTED_COLUMNS) | {'id', 'updated_at'} == set(tables['task'])
    assert set(_db.STATUS_COLUMNS) == set(tables['node_status'])
    assert set(_db.SEGMENT_COLUMNS) == set(tables['task_segment'])
    with open(_db.SCHEMA_FILE, encoding='utf-8') as f:
        text = f.read()
    assert text.count('utf8mb4') >= 3 and text.count('ENGINE=InnoDB') == 5
    assert 'UNIQUE KEY uq_task_speech_id (speech_id)' in text


def test_event_values_are_bound_never_spliced_into_sql():
    hostile = "x'); DROP TABLE task; -- \\ \"한국\""
    t = time.time()
    ev = {'event': _records.FINAL, 'node': 'n', 'serverSeq': 1,
          'payload': final('sid1', t, transcript=hostile, domainName=hostile)[1].to_dict()}
    sql, params = _db.statement(ev)
    assert hostile not in sql and 'DROP' not in sql
    assert sql.count('%s') == len(params) and hostile in params


# ------------------------------------------------------------------ svcmgr.py db init / check

def test_db_init_and_check_commands_and_password_from_environment(make_daemon, dbname, monkeypatch):
    d = make_daemon()
    d.write_ini(db_section(dbname))
    proc = d.cli('db', 'check')
    assert proc.returncode == 1 and 'Unknown database' in proc.stderr and 'db init' in proc.stderr
    assert d.cli('db', 'init', check=True).stdout.startswith('db init: database %s' % dbname)
    assert d.cli('db', 'init', check=True)       # idempotent
    out = d.cli('db', 'check', check=True).stdout
    assert 'matches schema.sql' in out and 'task: 0 row(s)' in out and 'node_status: 0 row(s)' in out
    assert 'task_segment: 0 row(s)' in out
    assert 'spool: 0 event(s)' in out
    cols = query(dbname, 'SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME FROM information_schema.COLUMNS'
                         ' WHERE TABLE_SCHEMA = %s AND CHARACTER_SET_NAME IS NOT NULL', (dbname,))
    assert cols and {c['CHARACTER_SET_NAME'] for c in cols} == {'utf8mb4'}
    engines = query(dbname, 'SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s', (dbname,))
    assert [e['ENGINE'] for e in engines] == ['InnoDB'] * 5

    query(dbname, 'ALTER TABLE task DROP COLUMN transcript')
    proc = d.cli('db', 'check')
    assert proc.returncode == 1 and 'table task lacks column(s) transcript' in proc.stderr
    query(dbname, 'DROP TABLE node_status')
    proc = d.cli('db', 'check')
    assert proc.returncode == 1 and 'table node_status is missing' in proc.stderr
    query(dbname, 'DROP TABLE task')             # db init never alters; recreated below

    # The password from the environment replaces the one in app.ini.
    user = dbname[-16:]
    with server_connection() as conn, conn.cursor() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, "pw,#%$'\"한"))
        cur.execute('GRANT ALL ON `%s`.* TO %%s@%%s' % dbname, (user, '%'))
    try:
        d.write_ini(db_section(dbname).replace('user = root', 'user = %s' % user)
                    .replace('password = ""', 'password = wrong\npassword_env = SVCMGR_TEST_DB_PW'))
        monkeypatch.delenv('SVCMGR_TEST_DB_PW', raising=False)
        proc = d.cli('db', 'init')
        assert proc.returncode == 1 and 'Access denied' in proc.stderr
        monkeypatch.setenv('SVCMGR_TEST_DB_PW', "pw,#%$'\"한")
        d.cli('db', 'init', check=True)
        assert 'matches schema.sql' in d.cli('db', 'check', check=True).stdout
    finally:
        with server_connection() as conn, conn.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))

    d.write_ini(db_section('bad-name`; DROP'))
    proc = d.cli('db', 'init')
    assert proc.returncode == 1 and '[db] name' in proc.stderr


# ------------------------------------------------------------------ the writer on its own

def make_sink(tmp_path, name, port=PORT, retry=(0.2, 1.0)):
    return _db.DatabaseSink(load_cfg(tmp_path, name, port), str(tmp_path / 'records'), retry=retry)


def test_writer_upserts_in_order_and_guards_final_rows(tmp_path, dbname):
    init_schema(tmp_path, dbname)
    sink = make_sink(tmp_path, dbname)
    try:
        t = time.time() - 100
        for ev in task_events('g1', t):
            sink.handle(*ev)
        wait_idle(sink)
        row_id = rows(dbname)['g1']['id']
        assert sink.row_id('g1') is None                # ended: forgotten
        # Late and replayed events after the end change nothing.
        sink.handle(*state('g1', 'CONVERT', t + 3))
        sink.handle(*accepted('g1', t, domainName='changed'))
        sink.handle(*state('g1', 'RECOGNIZE', t + 0.2))
        wait_idle(sink)
        r = rows(dbname)['g1']
        assert (r['id'], r['state'], r['result'], r['transcript'], r['domain_name']) == \
            (row_id, 'DONE', '0', 'hello', 'SGDefault')
        assert r['node'] == 'test-node' and r['server_seq'] == 7
        # A running task: an older state (retry order) does not overwrite a newer one.
        sink.handle(*accepted('g2', t))
        sink.handle(*state('g2', 'RECOGNIZE', t + 0.5, worker=2))
        sink.handle(*state('g2', 'CONVERT', t + 0.1, worker=1))
        wait_idle(sink)
        r2 = rows(dbname)['g2']
        assert (r2['state'], r2['worker'], r2['finished_at']) == ('RECOGNIZE', 2, None)
        assert sink.row_id('g2') == r2['id']            # seq for 3001
        # The same speechID used again by a later task starts the row afresh, same id.
        t2 = t + 50
        sink.handle(*accepted('g1', t2, fileName='again.wav'))
        wait_idle(sink)
        r = rows(dbname)['g1']
        assert (r['id'], r['state'], r['result'], r['transcript'], r['finished_at'], r['file_name']) == \
            (row_id, 'INIT', None, None, None, 'again.wav')
        assert r['created_at'] == datetime.datetime.strptime(_records.stamp(t2), _db.STAMP_FORMAT)
        # ... and a replayed FINAL of the earlier task does not overwrite it.
        sink.handle(*final('g1', t, transcript='old one'))
        wait_idle(sink)
        assert rows(dbname)['g1']['transcript'] is None
        assert sink.stats()['written'] >= 10 and sink.stats()['rejected'] == 0
    finally:
        sink.close()


def test_replaying_the_same_spool_twice_changes_nothing(tmp_path, dbname):
    init_schema(tmp_path, dbname)
    records = tmp_path / 'records'
    t = time.time() - 1000
    hostile = "it's \"q\" \\ ; DROP TABLE task; -- 한국어"
    probe = _db.DatabaseSink(load_cfg(tmp_path, dbname), str(records), start=False)
    events = []
    for i in range(20):
        events += [spool_event(probe, ev) for ev in task_events('r%02d' % i, t + i, hostile + str(i),
                                                                 segments_of(hostile + str(i), i % 4))]
    # A speechID used twice, and an ACCEPTED of a task that never ended.
    events += [spool_event(probe, ev) for ev in task_events('r03', t + 500, 'second', segments_of('second', 1))]
    events.append(spool_event(probe, accepted('open', t + 600)))
    lines = ''.join(json.dumps(ev) + '\n' for ev in events)

    def replay():
        os.makedirs(records, exist_ok=True)
        (records / 'db-spool.jsonl').write_text(lines)
        sink = make_sink(tmp_path, dbname)
        wait_idle(sink)
        assert not (records / 'db-spool.jsonl').exists()
        stats = sink.stats()
        sink.close()
        return stats

    assert replay()['replayed'] == len(events)
    first = query(dbname, 'SELECT * FROM task ORDER BY id')
    first_segments = segment_rows(dbname)
    time.sleep(0.05)
    assert replay()['replayed'] == len(events)
    assert query(dbname, 'SELECT * FROM task ORDER BY id') == first      # updated_at included
    assert segment_rows(dbname) == first_segments
    by_id = {r['speech_id']: r for r in first}
    assert len(first) == 21 and by_id['r03']['transcript'] == 'second'
    assert by_id['r05']['transcript'] == hostile + '5' and by_id['open']['finished_at'] is None
    # Segments: exactly the task's own, once each; r03's second task had 1 where the first had 3.
    counts = {}
    for row in first_segments:
        counts[row['speech_id']] = counts.get(row['speech_id'], 0) + 1
        assert row['task_sid'] == row['speech_id']
    assert counts == {'r%02d' % i: (1 if i == 3 else i % 4) for i in range(20) if i % 4 or i == 3}
    r05 = [row for row in first_segments if row['speech_id'] == 'r05']
    assert [(row['seq'], row['channel'], row['text'], row['low_confidence']) for row in r05] == [
        (1, 'A', hostile + '5', 1)]
    assert json.loads(r05[0]['words']) == segments_of(hostile + '5', 1)[0]['words']


def test_a_database_without_the_segment_table_still_gets_task_rows(tmp_path, dbname):
    init_schema(tmp_path, dbname)
    query(dbname, 'DROP TABLE task_segment')
    sink = make_sink(tmp_path, dbname)
    try:
        t = time.time() - 100
        for ev in task_events('old-1', t, 'hello there', segments_of('hello there', 2)):
            sink.handle(*ev)
        wait_idle(sink)
        assert rows(dbname)['old-1']['transcript'] == 'hello there'
        assert sink.stats()['rejected'] == 0 and sink.no_segment_table
    finally:
        sink.close()
    # `db init` adds the table; the next connection writes segments again.
    init_schema(tmp_path, dbname)
    sink = make_sink(tmp_path, dbname)
    try:
        for ev in task_events('new-1', time.time() - 50, 'hi', segments_of('hi', 2)):
            sink.handle(*ev)
        wait_idle(sink)
        assert [(r['speech_id'], r['seq']) for r in segment_rows(dbname)] == [('new-1', 1), ('new-1', 2)]
    finally:
        sink.close()


def test_database_refused_then_back_events_spooled_and_replayed(tmp_path, dbname, proxy):
    init_schema(tmp_path, dbname)
    proxy.cut()
    sink = make_sink(tmp_path, dbname, port=proxy.port)
    try:
        t = time.time()
        begin = time.monotonic()
        for i in range(100):
            for ev in task_events('o%03d' % i, t + i):
                sink.handle(*ev)
        assert time.monotonic() - begin < 1.0             # handle() only enqueues
        wait_for(lambda: len(sink.spool) == 400, 20, '400 events in the spool')
        assert sink.conn is None and 'cannot connect' in sink.stats()['lastError']
        assert rows(dbname) == {}
        proxy.restore()
        wait_idle(sink)
        got = rows(dbname)
        assert len(got) == 100 and all(r['state'] == 'DONE' and r['finished_at'] for r in got.values())
        assert not os.path.exists(sink.spool.path) and sink.stats()['replayed'] == 400
    finally:
        sink.close()


def test_hung_database_times_out_and_a_locked_table_spools_until_unlocked(tmp_path, dbname, proxy):
    init_schema(tmp_path, dbname)
    sink = make_sink(tmp_path, dbname, port=proxy.port)
    try:
        t = time.time()
        sink.handle(*accepted('h0', t))
        wait_idle(sink)
        # Hung: the connection stays open but answers nothing; READ_TIMEOUT ends the wait.
        proxy.hang()
        sink.handle(*accepted('h1', t + 1))
        wait_for(lambda: len(sink.spool) >= 1, _db.READ_TIMEOUT + 15, 'the hung write to time out')
        proxy.restore()
        wait_idle(sink, 40)
        assert set(rows(dbname)) == {'h0', 'h1'}
        # Locked: the server fails our statement after lock_wait_timeout.
        locker = server_connection(database=dbname)
        with locker.cursor() as cur:
            cur.execute('LOCK TABLES task WRITE')
        sink.handle(*accepted('h2', t + 2))
        sink.handle(*final('h2', t + 2))
        wait_for(lambda: len(sink.spool) >= 2, _db.LOCK_WAIT_SECS + 15, 'the locked write to fail')
        assert 'Lock wait timeout' in sink.stats()['lastError']
        locker.close()               # releases the lock
        wait_idle(sink, 60)
        assert rows(dbname)['h2']['state'] == 'DONE'
    finally:
        sink.close()


def test_a_malformed_event_is_rejected_and_the_rest_goes_on(tmp_path, dbname):
    init_schema(tmp_path, dbname)
    sink = make_sink(tmp_path, dbname)
    try:
        t = time.time()
        sink.handle(_records.ACCEPTED, {'speechID': 'bad'})             # no startTime
        sink.handle(*accepted('good', t))
        wait_idle(sink)
        assert set(rows(dbname)) == {'good'}
        assert sink.stats()['rejected'] == 1
        with open(tmp_path / 'records' / 'db-rejected.jsonl') as f:
            assert json.loads(f.readline())['event']['payload'] == {'speechID': 'bad'}
    finally:
        sink.close()


def test_values_the_database_would_refuse_are_made_storable(tmp_path, dbname):
    # NaN comes out of json.loads of a request; a lone surrogate out of a \ud800 escape.
    init_schema(tmp_path, dbname)
    sink = make_sink(tmp_path, dbname)
    try:
        t = time.time()
        sink.handle(*accepted('v1', t, memo=float('nan'), deep=[{'x': float('inf')}], fileName='a\ud800b',
                              domainName='d' * 300, filePath='p' * 100000))
        ev = final('v1', t)
        ev[1].duration = float('inf')
        ev[1].request['memo'] = float('nan')
        sink.handle(*ev)
        wait_idle(sink)
        r = rows(dbname)['v1']
        assert sink.stats()['rejected'] == 0 and r['state'] == 'DONE'
        assert json.loads(r['request']) == {'memo': None, 'deep': [{'x': None}]}
        assert r['file_name'] == 'a?b' and r['domain_name'] == 'd' * 255 and len(r['file_path']) == 16000
        assert r['duration'] is None
    finally:
        sink.close()


# ------------------------------------------------------------------ the real daemon

def check_rows_match_records(d, name, n):
    recs = {r['data']['speechID']: r for r in d.wait_records(n, timeout=120)}
    assert len(recs) == n
    got = wait_for(lambda: (lambda rs: rs if len(rs) == n and all(r['finished_at'] for r in rs.values())
                            else None)(rows(name)), 90, '%d final rows' % n)
    assert set(got) == set(recs)
    for sid, rec in recs.items():
        r = got[sid]
        assert (r['result'], r['state'], r['transcript']) == \
            (rec['data']['result'], rec['state'], rec['data']['transcript']), sid
    return got, recs


def test_client_task_rows_have_every_field(make_daemon, dbname):
    d = db_daemon(make_daemon, dbname).start()
    c = d.client()
    folder, mono = d.fixture('en_hello.wav')
    _, stereo = d.fixture('stereo_call.wav')
    _, dual = d.fixture('dual_mono.wav')
    c.send(1002, transcribe_req(folder, mono, sid='mono1', domainName='고객센터', domainCode='SG0002',
                                audioPath=os.path.join(d.data, 'out'), custom={'k': ['v', 1]}))
    c.send(1002, transcribe_req(folder, stereo, sid='stereo1'))
    c.send(1002, transcribe_req(folder, 'missing.wav', sid='missing1'))
    c.send(1002, transcribe_req(folder, dual, sid='dual1'))
    answers = {b['speechID']: b for _, b in c.recv_n(4, timeout=120)}
    assert answers['mono1']['result'] == '0' and answers['missing1']['result'] == '4'
    got, recs = check_rows_match_records(d, dbname, 4)

    r = got['mono1']
    assert r['id'] >= 1 and r['node'] == 'test-node' and r['server_seq'] == 1 and r['source'] == 'client'
    assert (r['domain_name'], r['domain_code']) == ('고객센터', 'SG0002')
    assert (r['file_id'], r['file_name'], r['file_path']) == (mono, mono, folder)
    assert r['audio_path'] == os.path.join(d.data, 'out')
    assert (r['audio_wav'], r['audio_mp3']) == ('mono1.wav', None)
    assert r['channels'] == 1 and abs(r['duration'] - answers['mono1']['duration']) < 1e-6
    assert (r['state'], r['result'], r['message']) == ('DONE', '0', None)
    assert r['transcript'] == TEXTS['en_hello.wav']
    assert json.loads(r['channel_transcripts']) == [{'channel': 'A', 'transcript': TEXTS['en_hello.wav']}]
    marks = [m['mark'] for m in json.loads(r['timings'])]
    assert marks == ['TRANSCRIBE_START', 'WORKER_PUT', 'WORKER_GET', 'TRANSCRIBE_END']
    # seq is the row id when the writer had written the row by the task's end, else the day counter
    assert r['elapsed_secs'] > 0 and r['worker'] in (1, 2) and isinstance(r['seq'], int) and r['seq'] >= 1
    assert json.loads(r['request']) == {'custom': {'k': ['v', 1]}}
    assert r['created_at'] < r['started_at'] < r['finished_at'] and r['state_at'] == r['finished_at']
    assert r['created_at'] == datetime.datetime.strptime(recs['mono1']['startTime'], _db.STAMP_FORMAT)
    assert r['finished_at'] == datetime.datetime.strptime(recs['mono1']['endTime'], _db.STAMP_FORMAT)

    s = got['stereo1']
    assert s['channels'] == 2 and s['transcript'] == TEXTS['stereo_call.wav']['transcript']
    # A dual-mono file is recognised as one channel, but the row tells the source had two.
    dm = got['dual1']
    assert dm['channels'] == 2 and len(json.loads(dm['channel_transcripts'])) == 1
    assert recs['dual1']['sourceChannels'] == 2 and recs['dual1']['audioPath'] == dm['audio_path']
    assert [ch['channel'] for ch in json.loads(s['channel_transcripts'])] == ['A', 'B']
    assert s['audio_path'].startswith(os.path.join(d.base, 'batch', 'rec_mp3'))

    m = got['missing1']
    assert (m['state'], m['result'], m['transcript']) == ('NOFILE_ID', '4', '')
    assert 'missing.wav' in m['message'] and m['finished_at'] is not None

    body = monitor(d)['db']
    assert body['enabled'] is True and body['connected'] is True and body['node'] == 'test-node'
    assert body['written'] >= 9 and body['spooled'] == 0 and body['queuePeak'] >= 1
    assert body['lastError'] is None


def test_scanned_task_row(make_daemon, dbname):
    # Needs the scanner (_scanner.py): a file dropped into audio_source_path becomes a task
    # with source 'scanner' and the [directory] domain.
    d = db_daemon(make_daemon, dbname)
    with open(d.ini) as f:
        text = f.read()
    with open(d.ini, 'w') as f:
        f.write(text.replace('scan_enabled = false', 'scan_enabled = true'))
    d.start()
    os.makedirs(d.batch, exist_ok=True)
    shutil.copy(os.path.join(FIXTURES, 'en_email.wav'), os.path.join(d.batch, 'scan1.part'))
    os.rename(os.path.join(d.batch, 'scan1.part'), os.path.join(d.batch, '스캔 scan1.wav'))
    got = wait_for(lambda: [r for r in rows(dbname).values() if r['finished_at']], 90, 'the scanned task row')
    r = got[0]
    assert r['source'] == 'scanner' and r['state'] == 'DONE' and r['result'] == '0'
    assert r['transcript'] == TEXTS['en_email.wav']
    assert (r['domain_name'], r['domain_code']) == ('SGDefault', 'SG0001')
    assert '스캔 scan1.wav' in (r['file_name'] or r['file_id'])
    assert r['created_at'] <= r['started_at'] <= r['finished_at'] and r['node'] == 'test-node'
    check_rows_match_records(d, dbname, 1)


def test_node_status_row_is_refreshed_and_marked_stopped(make_daemon, dbname):
    d = db_daemon(make_daemon, dbname).start()
    first = wait_for(lambda: query(dbname, 'SELECT * FROM node_status'), 20, 'the node status row')[0]
    later = wait_for(lambda: (lambda r: r if r and r[0]['updated_at'] > first['updated_at'] else None)(
        query(dbname, 'SELECT * FROM node_status')), 20, 'updated_at to advance')[0]
    assert later['node'] == 'test-node' and later['status'] == 'running' and later['engine_up'] == 1
    assert later['pid'] == d.pid and later['version'] == '2.0' and later['engine_type'] == 'pocketsphinx'
    assert later['workers'] == 2 and later['max_tasks'] == 100 and later['server_seq'] == 1
    assert (later['tasks_running'], later['tasks_queued']) == (0, 0)
    assert set(json.loads(later['cpu'])) == {'user', 'system', 'idle', 'nice'}
    assert 0 <= later['cpu_percent'] <= 100 and later['mem_total'] > 0 and 0 < later['mem_percent'] < 100
    disks = json.loads(later['disks'])
    assert disks and {'device', 'mount', 'total', 'percent'} <= set(disks[0])
    assert later['started_at'] <= later['updated_at'] and later['db_spooled'] == 0
    # Running tasks show up in the counters.
    c = d.client()
    folder, name = d.fixture('en_hello.wav')
    for i in range(4):
        c.send(1002, transcribe_req(folder, name, sid='busy%d' % i))
    wait_for(lambda: query(dbname, 'SELECT * FROM node_status WHERE tasks_running + tasks_queued > 0'),
             20, 'a status row with tasks')
    c.recv_n(4, timeout=120)
    d.stop()
    r = query(dbname, 'SELECT * FROM node_status')[0]
    assert r['status'] == 'stopped' and r['engine_up'] == 0 and r['updated_at'] > later['updated_at']


@pytest.mark.slow
def test_200_tasks_through_a_killed_connection_a_hung_and_a_cut_database(make_daemon, dbname, proxy):
    n = 200
    d = db_daemon(make_daemon, dbname, port=proxy.port, workers=2, max_tasks=250, timeout=300)
    d.start()
    for i in range(n):
        shutil.copy(os.path.join(FIXTURES, 'en_morning.wav'), os.path.join(d.data, 'm%03d.wav' % i))
    c = d.client(timeout=600)
    answered = []
    reader = threading.Thread(target=lambda: answered.extend(c.recv(600)[1] for _ in range(n)), daemon=True)
    reader.start()
    sent = [0]

    def send(k):
        for i in range(sent[0], sent[0] + k):
            c.send(1002, transcribe_req(d.data, 'm%03d.wav' % i, sid='out%03d' % i))
        sent[0] += k

    def answers(k):
        wait_for(lambda: len(answered) >= k, 300, '%d answers' % k)

    # 1. Its connection killed inside MariaDB in the middle of a batch.
    send(40)
    answers(10)
    ids = query(dbname, 'SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()',
                (dbname,))
    assert ids, 'the daemon has no database connection'
    for row in ids:
        query(dbname, 'KILL %s', (row['ID'],))
    answers(40)
    # 2. Hung: connected, but nothing gets through; tasks go on meanwhile.
    proxy.hang()
    send(40)
    wait_for(lambda: monitor(d)['db']['spooled'] > 0, 2 * _db.READ_TIMEOUT + 20, 'the hung database to be noticed')
    answers(80)
    # 3. Cut: every connection closed, new ones refused.
    proxy.cut()
    send(60)
    answers(140)
    body = monitor(d)['db']
    assert body['connected'] is False and body['spooled'] > 0 and body['lastError']
    # 4. Back, with tasks still coming.
    proxy.restore()
    send(n - sent[0])
    reader.join(600)
    assert len(answered) == n and all(b['result'] == '0' for b in answered)
    got, recs = check_rows_match_records(d, dbname, n)
    assert query(dbname, 'SELECT COUNT(*) AS n, COUNT(finished_at) AS f FROM task')[0] == {'n': n, 'f': n}
    assert all(r['transcript'] == TEXTS['en_morning.wav'] for r in got.values())
    # Each task's segment, written with its final row through the outages and the replay: once each.
    segs = query(dbname, 'SELECT s.speech_id, COUNT(*) AS n, MIN(s.text) AS text, MIN(t.speech_id) AS owner'
                         ' FROM task_segment s JOIN task t ON t.id = s.task_id GROUP BY s.speech_id')
    assert len(segs) == n
    assert all((r['n'], r['text'], r['owner']) == (1, TEXTS['en_morning.wav'], r['speech_id']) for r in segs)
    body = wait_for(lambda: (lambda b: b if b['spooled'] == 0 and b['connected'] else None)(monitor(d)['db']),
                    60, 'the spool to be replayed')
    assert body['replayed'] > 0 and body['queuePeak'] >= 1
    assert not os.path.exists(os.path.join(d.base, 'records', 'db-spool.jsonl'))


def test_daemon_started_while_the_database_is_down_and_stopped_before_it_is_back(make_daemon, dbname, proxy,
                                                                                  tmp_path):
    init_schema(tmp_path, dbname)
    proxy.cut()
    d = make_daemon()
    d.write_ini(db_section(dbname, proxy.port))
    d.start()
    c = d.client()
    folder, name = d.fixture('en_morning.wav')
    for i in range(3):
        c.send(1002, transcribe_req(folder, name, sid='down%d' % i))
    assert all(b['result'] == '0' for _, b in c.recv_n(3, timeout=120))
    d.wait_records(3)
    d.stop()
    spool = os.path.join(d.base, 'records', 'db-spool.jsonl')
    assert _db.spool_count(os.path.dirname(spool)) == 3 * 4 and rows(dbname) == {}
    proxy.restore()
    d.start()                                   # replays at start
    wait_for(lambda: len([r for r in rows(dbname).values() if r['finished_at']]) == 3, 30, '3 replayed rows')
    wait_for(lambda: not os.path.exists(spool), 10, 'the spool to be removed')
    check_rows_match_records(d, dbname, 3)


def test_hostile_fields_are_stored_verbatim_and_harm_nothing(make_daemon, dbname):
    d = db_daemon(make_daemon, dbname).start()
    query(dbname, 'CREATE TABLE x (a INT)')
    evil = "통화 it's \"q\" \\ back\\\\slash ; DROP TABLE x; -- 한국어 %s %(x)s \\' \\0"
    sub = os.path.join(d.data, "폴더 'x\\y'")
    os.makedirs(sub)
    fname = evil.replace('/', '') + '.wav'
    shutil.copy(os.path.join(FIXTURES, 'en_hello.wav'), os.path.join(sub, fname))
    sids = ['a-:._--', '0x27--', '1:-1', 'DROP_TABLE_task--']
    c = d.client()
    for sid in sids:
        c.send(1002, transcribe_req(sub, fname, sid=sid, fileName=evil + "'; DROP TABLE x; --",
                                    domainName="'; DROP TABLE x; -- \\ \"따옴표\" ' OR '1'='1",
                                    domainCode="' OR 1=1 #", memo=evil))
    answers = {b['speechID']: b for _, b in c.recv_n(len(sids), timeout=120)}
    assert all(answers[s]['result'] == '0' for s in sids), answers
    got, recs = check_rows_match_records(d, dbname, len(sids))
    for sid in sids:
        r = got[sid]
        assert r['file_id'] == fname and r['file_path'] == sub
        assert r['file_name'] == evil + "'; DROP TABLE x; --"
        assert r['domain_name'] == "'; DROP TABLE x; -- \\ \"따옴표\" ' OR '1'='1"
        assert r['domain_code'] == "' OR 1=1 #"
        assert json.loads(r['request']) == {'memo': evil}
        assert r['transcript'] == TEXTS['en_hello.wav']
    tables = {t['TABLE_NAME'] for t in query(dbname, 'SELECT TABLE_NAME FROM information_schema.TABLES'
                                                     ' WHERE TABLE_SCHEMA = %s', (dbname,))}
    assert tables == {'task', 'node_status', 'task_segment', 'cluster_task', 'cluster_node', 'x'}
    assert 'matches schema.sql' in d.cli('db', 'check', check=True).stdout


def test_a_deadlock_victim_is_run_again_on_its_connection(dbname):
    """InnoDB undoes one of two transactions that lock rows in opposite orders (1213); the
    victim runs again from its start on the same connection and its writes land."""
    with server_connection() as conn, conn.cursor() as cur:
        cur.execute('CREATE DATABASE `%s`' % dbname)
    query(dbname, 'CREATE TABLE pair (id INT PRIMARY KEY, v INT) ENGINE=InnoDB')
    query(dbname, 'INSERT INTO pair VALUES (1, 0), (2, 0), (3, 0), (4, 0)')
    heavy, light = server_connection(database=dbname), server_connection(database=dbname)
    locked, runs = threading.Event(), []

    def body(conn):
        runs.append(1)
        conn.begin()
        with conn.cursor() as cur:
            cur.execute('UPDATE pair SET v = v + 10 WHERE id = 2')
            if len(runs) == 1:
                locked.set()
                # Waits for `heavy`, which then asks for row 2: a deadlock, and `light` (one row
                # changed against three) is InnoDB's victim.
            cur.execute('UPDATE pair SET v = v + 10 WHERE id = 1')
        conn.commit()
        return len(runs)

    try:
        with heavy.cursor() as cur:
            heavy.begin()
            for i in (1, 3, 4):         # one row at a time: IN () on four rows would scan, locking all
                cur.execute('UPDATE pair SET v = v + 1 WHERE id = %s', (i,))
            out = []
            t = threading.Thread(target=lambda: out.append(_db.again_on_deadlock(light, body)))
            t.start()
            assert locked.wait(30)
            wait_for(lambda: query(dbname, "SELECT COUNT(*) AS n FROM information_schema.innodb_trx"
                                           " WHERE trx_state = 'LOCK WAIT'")[0]['n'], 30, 'light waiting for row 1')
            cur.execute('UPDATE pair SET v = v + 1 WHERE id = 2')
            heavy.commit()
        t.join(30)
        assert out == [2]
        assert {r['id']: r['v'] for r in query(dbname, 'SELECT * FROM pair')} == {1: 11, 2: 11, 3: 1, 4: 1}
    finally:
        heavy.close()
        light.close()
