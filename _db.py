"""MySQL/MariaDB persistence: the task rows and the node-status row, written by one thread of
the master with its own PyMySQL connection, fed by a queue, so neither the loop nor the other
sinks ever wait on the database. Events the database cannot take wait in records/db-spool.jsonl
and are replayed in order; every write is an idempotent upsert keyed by speechID.
Also the `svcmgr.py db init` and `db check` commands.
"""
import datetime
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time

import pymysql

import _config
import _jsonstrict
from _records import ACCEPTED, FINAL, STATE, TaskRecord, stamp, write_synced
from _states import Mark

log = logging.getLogger('db')

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_FILE = os.path.join(HERE, 'schema.sql')
if not os.path.isfile(SCHEMA_FILE):     # an installed svcmgr (pip install .): the data files' copy
    SCHEMA_FILE = os.path.join(sys.prefix, 'share', 'svcmgr', 'schema.sql')
SPOOL_NAME = 'db-spool.jsonl'
REJECTED_NAME = 'db-rejected.jsonl'

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 10
WRITE_TIMEOUT = 10
# A locked table must fail our statement on the server well before READ_TIMEOUT gives up on it.
LOCK_WAIT_SECS = 5
RETRY_MIN_SECS, RETRY_MAX_SECS = 1.0, 30.0
# Events per transaction, when they queue up or are replayed.
BATCH = 200
STOP_JOIN_SECS = 15

# Identifiers cannot be bound; the database name is only ever quoted after this check.
NAME_RE = re.compile(r'[A-Za-z0-9_$]{1,64}\Z')
STAMP_FORMAT = '%Y.%m.%d %H:%M:%S.%f'

# Errors of the event itself: retrying cannot help, so the event goes to db-rejected.jsonl.
POISON = (pymysql.err.DataError, pymysql.err.IntegrityError, pymysql.err.NotSupportedError)
# An event the code cannot turn into a statement: as hopeless as POISON.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, ArithmeticError)
# Everything else the database or the network says is an outage: spool and retry.
OUTAGE = (pymysql.err.MySQLError, OSError)
# The connection itself is gone: one immediate reconnect is worth trying before spooling.
_LOST = {0, 2006, 2013, 2014, 2055}
# InnoDB undid the transaction as a deadlock's victim (two writers upserting the same rows in a
# different order, as the cluster thread and the db writer do): running it again is the remedy.
DEADLOCK = 1213
DEADLOCK_TRIES = 5

# Longest values kept, in characters; TEXT holds 65535 bytes, 4 a character at worst.
_TEXT = 16000
_BIG_TEXT = 1000000
_JSON = 1000000

TASK_FIELDS = {'domainName': ('domain_name', 255), 'domainCode': ('domain_code', 255),
               'fileID': ('file_id', _TEXT), 'fileName': ('file_name', _TEXT),
               'filePath': ('file_path', _TEXT), 'audioPath': ('audio_path', _TEXT)}

# Columns a task row takes from its request (replaced only by a newer task with the same speechID),
# from its running state, and from its end.
BASE_COLUMNS = ('node', 'server_seq', 'source', 'domain_name', 'domain_code', 'file_id', 'file_name',
                'file_path', 'audio_path', 'request')
RUN_COLUMNS = ('state', 'state_at', 'worker')
END_COLUMNS = ('result', 'message', 'transcript', 'channel_transcripts', 'timings', 'elapsed_secs',
               'duration', 'channels', 'audio_wav', 'audio_mp3', 'seq', 'finished_at')
STATUS_COLUMNS = ('node', 'server_seq', 'version', 'pid', 'status', 'engine_type', 'engine_up', 'workers',
                  'tasks_running', 'tasks_queued', 'max_tasks', 'cpu_percent', 'cpu', 'mem_total',
                  'mem_available', 'mem_percent', 'disks', 'db_queue', 'db_spooled', 'started_at',
                  'updated_at')


def _upsert(table, columns, updates):
    # Built from the constant column names above only; every value is a bound parameter.
    return 'INSERT INTO %s (%s) VALUES (%s) ON DUPLICATE KEY UPDATE %s' % (
        table, ', '.join(columns), ', '.join(['%s'] * len(columns)), ', '.join(updates))


def _when(cond, col):
    return '%s = IF(%s, VALUES(%s), %s)' % (col, cond, col, col)


_NEWER = 'VALUES(created_at) > created_at'        # the same speechID used again by a later task
_SAME_OR_NEWER = 'VALUES(created_at) >= created_at'
_TAIL = ('id = LAST_INSERT_ID(id)',
         # Last: the conditions above compare against the row's created_at before it changes.
         'created_at = GREATEST(created_at, VALUES(created_at))')

ACCEPTED_COLUMNS = ('speech_id', 'created_at') + BASE_COLUMNS + RUN_COLUMNS + ('started_at',) + END_COLUMNS
# A replayed ACCEPTED finds its own row (same created_at) and leaves it alone, final or not.
ACCEPTED_SQL = _upsert('task', ACCEPTED_COLUMNS,
                       [_when(_NEWER, c) for c in BASE_COLUMNS + RUN_COLUMNS + ('started_at',) + END_COLUMNS]
                       + list(_TAIL))

# A state never overwrites a final row, nor a newer state (a replay, a late event).
STATE_SQL = ('UPDATE task SET state = %s, worker = COALESCE(%s, worker), started_at = COALESCE(started_at, %s),'
             ' state_at = %s WHERE speech_id = %s AND finished_at IS NULL AND created_at <= %s'
             ' AND (state_at IS NULL OR state_at <= %s)')

FINAL_COLUMNS = ACCEPTED_COLUMNS
FINAL_SQL = _upsert('task', FINAL_COLUMNS,
                    [_when(_NEWER, c) for c in BASE_COLUMNS]
                    + [_when(_SAME_OR_NEWER, c) for c in RUN_COLUMNS + END_COLUMNS]
                    + ['started_at = IF(%s, VALUES(started_at), COALESCE(started_at, VALUES(started_at)))'
                       % _NEWER]
                    + list(_TAIL))

SEGMENT_COLUMNS = ('task_id', 'seq', 'speech_id', 'channel', 'start_secs', 'end_secs', 'text', 'confidence',
                   'low_confidence', 'words')
# A replayed final rewrites the same rows; rows past the last segment (an older task of the same
# speechID had more) go; the segments are written only while the row is this task's.
SEGMENT_OWNER_SQL = 'SELECT created_at FROM task WHERE id = %s'
SEGMENT_TRIM_SQL = 'DELETE FROM task_segment WHERE task_id = %s AND seq > %s'
# No such table: a database made before segments existed; `db init` adds it.
NO_TABLE = 1146


def segment_sql(n):
    """The upsert of `n` segment rows (column names are the constants above)."""
    row = '(%s)' % ', '.join(['%s'] * len(SEGMENT_COLUMNS))
    return 'INSERT INTO task_segment (%s) VALUES %s ON DUPLICATE KEY UPDATE %s' % (
        ', '.join(SEGMENT_COLUMNS), ', '.join([row] * n),
        ', '.join('%s = VALUES(%s)' % (c, c) for c in SEGMENT_COLUMNS[2:]))


STATUS_SQL = _upsert('node_status', STATUS_COLUMNS,
                     ['%s = VALUES(%s)' % (c, c) for c in STATUS_COLUMNS if c != 'node'])


# ---------------------------------------------------------------- values

def _text(value, limit):
    """A string the column can hold: lone surrogates replaced (utf8mb4 cannot store them), clipped."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        value = value.encode('utf-8', 'replace').decode('utf-8')
    return value[:limit]


def _json(value, limit=_JSON):
    if value is None:
        return None
    text = _text(_jsonstrict.dumps(value, ensure_ascii=False), None)     # NaN/Infinity as null
    if len(text) > limit:
        text = json.dumps({'truncated': True, 'chars': len(text)})
    return text


def _time(t):
    """Epoch seconds or a records stamp as local naive datetime, as records/ writes times."""
    if t is None:
        return None
    if isinstance(t, str):
        return datetime.datetime.strptime(t, STAMP_FORMAT)
    return datetime.datetime.fromtimestamp(float(t))


def _number(value, kind=float):
    if value is None or isinstance(value, bool):
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    # A NaN would reach the SQL as the bare word nan.
    return value if kind is not float or math.isfinite(value) else None


def _base_values(ev, request, source, audio_path=None):
    request = request if isinstance(request, dict) else {}
    values = {'node': _text(ev.get('node'), 128), 'server_seq': _number(ev.get('serverSeq'), int),
              'source': _text(source, 16)}
    for key, (col, limit) in TASK_FIELDS.items():
        value = request.get(key)
        values[col] = _text(value, limit) if isinstance(value, str) else None
    if audio_path:
        values['audio_path'] = _text(audio_path, _TEXT)
    extra = {k: v for k, v in request.items() if k not in TASK_FIELDS and k != 'speechID'}
    values['request'] = _json(extra) if extra else None
    return values


def accepted_params(ev):
    p = ev['payload']
    created = _time(p['created'] if p.get('created') is not None else p['startTime'])
    values = dict.fromkeys(ACCEPTED_COLUMNS)
    values.update(_base_values(ev, p.get('request'), p.get('source'), p.get('audioPath')))
    values.update(speech_id=_text(p['speechID'], 64), created_at=created, state=_text(p.get('state') or 'INIT', 16),
                  state_at=created)
    return [values[c] for c in ACCEPTED_COLUMNS]


def state_params(ev):
    p = ev['payload']
    at = _time(p['at'])
    return [_text(p['state'], 16), _number(p.get('worker'), int), at, at, _text(p['speechID'], 64), at, at]


def final_params(ev):
    rec = TaskRecord.from_dict(ev['payload'])
    created, finished = _time(rec.created), _time(rec.ended)
    got, ended = rec.mark_secs(Mark.WORKER_GET), rec.mark_secs(Mark.TRANSCRIBE_END)
    per_channel = rec.channels or None
    count = rec.source_channels if rec.source_channels is not None else (len(per_channel) if per_channel else None)
    values = dict.fromkeys(FINAL_COLUMNS)
    values.update(_base_values(ev, rec.request, rec.source.value, rec.audio_path))
    values.update(
        speech_id=_text(rec.speech_id, 64), created_at=created, state=_text(rec.state.value, 16),
        state_at=finished, worker=_number(rec.worker, int),
        started_at=created + datetime.timedelta(seconds=got) if got is not None else None,
        result=_text(rec.result.value, 2), message=_text(rec.message, _TEXT),
        transcript=_text(rec.transcript, _BIG_TEXT), channel_transcripts=_json(per_channel),
        timings=_json([{'mark': mark.value, 'secs': secs} for mark, secs in rec.marks]),
        elapsed_secs=ended if ended is not None else (finished - created).total_seconds(),
        duration=_number(rec.duration), channels=_number(count, int),
        audio_wav=_text(rec.audio_wav, 1024), audio_mp3=_text(rec.audio_mp3, 1024),
        seq=_number(rec.seq, int), finished_at=finished)
    return [values[c] for c in FINAL_COLUMNS]


def segment_params(rec, task_id):
    """The flat parameters of segment_sql(n) for a finished task's TaskRecord, and n."""
    params, n = [], 0
    for seg in rec.segments or ():
        conf = _number(seg.get('confidence'))
        params += [task_id, _number(seg['seq'], int), _text(rec.speech_id, 64),
                   _text(seg.get('channel') or 'A', 1), _number(seg['start']) or 0.0, _number(seg['end']) or 0.0,
                   _text(seg.get('text') or '', _TEXT), conf, 1 if seg.get('lowConfidence') else 0,
                   _json(seg.get('words') or [])]
        n += 1
    return params, n


_STATEMENTS = {ACCEPTED: (ACCEPTED_SQL, accepted_params), STATE: (STATE_SQL, state_params),
               FINAL: (FINAL_SQL, final_params)}


def deadlocked(exc):
    return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] == DEADLOCK


def again_on_deadlock(conn, fn, *args):
    """fn(conn, *args), run again from its start (up to DEADLOCK_TRIES times in all) when InnoDB
    chose it as a deadlock's victim; any other error, or the last deadlock, is raised."""
    for attempt in range(1, DEADLOCK_TRIES + 1):
        try:
            return fn(conn, *args)
        except pymysql.err.OperationalError as exc:
            if not deadlocked(exc) or attempt == DEADLOCK_TRIES:
                raise
            log.info('database: deadlock (try %d of %d); running the transaction again', attempt, DEADLOCK_TRIES)
            conn.rollback()


def statement(ev):
    """(sql, params) of a spooled or queued event; raises KeyError/TypeError/ValueError if malformed."""
    sql, params = _STATEMENTS[ev['event']]
    return sql, params(ev)


def status_params(info):
    values = dict.fromkeys(STATUS_COLUMNS)
    values.update(info)
    for col in ('cpu', 'disks'):
        values[col] = _json(values[col])
    for col in ('started_at', 'updated_at'):
        values[col] = _time(values[col])
    for col in ('cpu_percent', 'mem_percent'):
        values[col] = _number(values[col])
    return [values[c] for c in STATUS_COLUMNS]


# ---------------------------------------------------------------- connection

def node_name(cfg):
    """This node's key in node_status and task.node: [db] node, or host:port."""
    return _config.node_name(cfg)


def connect_params(cfg, database=True):
    db = cfg['db']
    # Bytes, because PyMySQL would encode a str password as latin-1 and fail on anything else.
    params = dict(host=db['ip'], port=int(db['port']), user=db['user'], password=db['password'].encode('utf-8'),
                  charset='utf8mb4', autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                  read_timeout=READ_TIMEOUT, write_timeout=WRITE_TIMEOUT,
                  init_command='SET SESSION innodb_lock_wait_timeout = %d, lock_wait_timeout = %d'
                  % (LOCK_WAIT_SECS, LOCK_WAIT_SECS))
    if database:
        params['database'] = db['name']
    return params


def _describe(exc):
    args = getattr(exc, 'args', ())
    if isinstance(exc, pymysql.err.MySQLError) and len(args) >= 2:
        return '(%s) %s' % (args[0], args[1])
    return '%s: %s' % (type(exc).__name__, exc)


def _lost(exc):
    return isinstance(exc, (pymysql.err.InterfaceError, OSError)) or \
        (isinstance(exc, pymysql.err.OperationalError) and exc.args and exc.args[0] in _LOST)


# ---------------------------------------------------------------- spool

class Spool:
    """An append-only JSON-lines file of events waiting for the database, replayed from the start.

    Appends are fsync'd. Replay moves `offset` forward; the file is removed only once every
    line in it has been applied, so a crash mid-replay just replays again (upserts are idempotent).
    """

    def __init__(self, path, rejected_path=None):
        self.path = path
        self.rejected_path = rejected_path
        self.lock = threading.Lock()
        self.offset = 0
        self.count = 0
        self._recover()

    def _recover(self):
        try:
            with open(self.path, 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            return
        if data and not data.endswith(b'\n'):
            # A crash in the middle of an append: the torn last line was never acknowledged.
            keep = data.rfind(b'\n') + 1
            log.error('db spool %s ends in a torn line (%d bytes); moved to %s',
                      self.path, len(data) - keep, self.rejected_path)
            _append_line(self.rejected_path, {'error': 'torn spool line',
                                              'raw': data[keep:].decode('utf-8', 'replace')})
            os.truncate(self.path, keep)
            data = data[:keep]
        self.count = sum(1 for line in data.split(b'\n') if line.strip())

    def __len__(self):
        return self.count

    def append(self, events):
        if not events:
            return
        data = ''.join(_jsonstrict.dumps(ev, ensure_ascii=True, separators=(',', ':'), default=str) + '\n'
                       for ev in events)
        data = data.encode('ascii')
        with self.lock:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_synced(self.path, data, os.O_APPEND | os.O_CREAT)
            self.count += len(events)

    def read(self):
        """Yield (event or None if unreadable, raw line, offset after it) from `offset` on."""
        try:
            f = open(self.path, 'rb')
        except FileNotFoundError:
            return
        with f:
            f.seek(self.offset)
            pos = self.offset
            for line in f:
                if not line.endswith(b'\n'):
                    return          # an append in progress; taken next time
                pos += len(line)
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
                yield ev, line, pos

    def advance(self, offset, lines=1):
        self.offset = offset
        self.count = max(0, self.count - lines)

    def clear(self):
        """Remove the file if everything in it was replayed; False if lines were appended meanwhile."""
        with self.lock:
            try:
                size = os.path.getsize(self.path)
            except FileNotFoundError:
                size = 0
            if size > self.offset:
                return False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.offset = 0
            self.count = 0
            return True


def _event_sid(ev):
    p = ev.get('payload') if isinstance(ev, dict) else None
    if not isinstance(p, dict):
        return None
    data = p.get('data')
    return p.get('speechID') or (data.get('speechID') if isinstance(data, dict) else None)


def _append_line(path, obj):
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'a', encoding='ascii') as f:
            f.write(_jsonstrict.dumps(obj, ensure_ascii=True, default=str) + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        log.error('cannot write %s: %s', path, exc)


# ---------------------------------------------------------------- the sink and its writer

class DatabaseSink:
    """A Reporter sink whose handle() only enqueues; its own writer thread talks to the database.

    `row_id(speechID)` is the task's row id once its ACCEPTED row is written (None before that,
    while the database is down, and after the task ended), for seq in 3001. `stats()` is the
    `db` object of Monitor (2003).
    """

    def __init__(self, cfg, records_dir, retry=(RETRY_MIN_SECS, RETRY_MAX_SECS), start=True):
        self.params = connect_params(cfg)
        self.node = node_name(cfg)
        self.server_seq = int(cfg['server']['server_seq'])
        self.version = cfg['setting']['version']
        self.rejected_path = os.path.join(records_dir, REJECTED_NAME)
        self.spool = Spool(os.path.join(records_dir, SPOOL_NAME), self.rejected_path)
        self.retry_min, self.retry_max = retry
        self.q = queue.Queue()
        self.peak = 0
        self.row_ids = {}
        self.no_segment_table = False
        self.conn = None
        self.written = self.replayed = self.rejected = self.spooled = 0
        self.last_error = self.last_error_at = None
        self._delay = self.retry_min
        self._next_try = 0.0
        self._status = self._last_status = None
        self._stopping = threading.Event()
        self._stop_seen = False
        self.thread = threading.Thread(target=self._run, name='db-writer', daemon=True)
        if start:
            self.thread.start()

    # ---- called from other threads: never touch the connection here

    def handle(self, event, payload):
        if event == FINAL:
            payload = payload.to_dict()     # the queue and the spool hold plain JSON
        if event in _STATEMENTS:
            self._put(('event', {'event': event, 'node': self.node, 'serverSeq': self.server_seq,
                                 'payload': payload}))

    def status(self, info):
        """Queue a node-status row (the latest one wins; it is never spooled)."""
        self._put(('status', info))

    def _put(self, item):
        self.q.put(item)
        depth = self.q.qsize()
        if depth > self.peak:
            self.peak = depth

    def row_id(self, speech_id):
        return self.row_ids.get(speech_id)

    def stats(self):
        return {'enabled': True, 'node': self.node, 'connected': self.conn is not None, 'queue': self.q.qsize(),
                'queuePeak': self.peak, 'spooled': len(self.spool), 'written': self.written,
                'replayed': self.replayed, 'rejected': self.rejected, 'lastError': self.last_error,
                'lastErrorTime': stamp(self.last_error_at) if self.last_error_at else None}

    def status_hook(self, facts):
        """Monitor's on_refresh: the node-status row from `facts()` (the master's engine and
        task counts) and the snapshot."""
        started = time.time()

        def refresh(snapshot):
            # Runs in the monitor thread; facts() only takes len()s and attributes of the master's state.
            cpu, mem = snapshot.get('cpu') or {}, snapshot.get('memory') or {}
            idle = cpu.get('idle')
            info = {'node': self.node, 'server_seq': self.server_seq, 'version': self.version, 'pid': os.getpid(),
                    'status': 'running', 'cpu_percent': None if idle is None else round(100 - idle, 1),
                    'cpu': cpu, 'mem_total': mem.get('total'), 'mem_available': mem.get('available'),
                    'mem_percent': mem.get('percent'), 'disks': snapshot.get('disk'),
                    'started_at': started, 'updated_at': time.time()}
            info.update(facts())
            self.status(info)
        return refresh

    def close(self, timeout=STOP_JOIN_SECS):
        """Write or spool everything queued, then end the writer (called by the Reporter at stop)."""
        self._stopping.set()
        self.q.put(('stop', None))
        if not self.thread.is_alive():
            return
        self.thread.join(timeout)
        if self.thread.is_alive():
            # The writer hangs in a statement: keep what is still queued on disk rather than lose it.
            left = []
            while True:
                try:
                    kind, item = self.q.get_nowait()
                except queue.Empty:
                    break
                if kind == 'event':
                    left.append(item)
            try:
                self.spool.append(left)
            except OSError as exc:
                log.error('db writer: cannot write %s (%s); %d event(s) lost', self.spool.path, exc, len(left))
                return
            log.error('db writer did not finish within %s s; %d event(s) spooled for the next start',
                      timeout, len(left))

    # ---- the writer thread

    def _run(self):
        log.info('db writer: node %s, database %s at %s:%s; %d spooled event(s) to replay',
                 self.node, self.params['database'], self.params['host'], self.params['port'], len(self.spool))
        while True:
            try:
                self._step()
            except Exception:  # the writer's one catch-all: log, back off, go on
                log.error('db writer: unexpected error', exc_info=True)
                self._close_conn()
                self._schedule_retry()
                time.sleep(self.retry_min)
            if self._stop_seen:
                break
        try:
            self._finish()
        except Exception:  # at stop, log rather than die silently with events in hand
            log.error('db writer: error while stopping', exc_info=True)

    def _wait(self):
        if self.conn is None or len(self.spool):
            return max(0.01, min(1.0, self._next_try - time.monotonic()))
        return 1.0

    def _step(self):
        # First reconnect and replay when due, so that at start nothing queued needs the spool.
        if (self.conn is None or len(self.spool)) and time.monotonic() >= self._next_try:
            if self.conn is not None or self._connect():
                self._replay()
        try:
            kind, item = self.q.get(timeout=self._wait())
        except queue.Empty:
            kind, item = None, None
        if kind == 'stop':
            self._stop_seen = True
            return
        if kind == 'status':
            self._status = item
        elif kind == 'event':
            if self.conn is None or len(self.spool):
                # Keep the order: once something waits in the spool, everything after it does too.
                self._to_spool([item] + self._take_ready())
            else:
                self._apply_or_spool([item] + self._take_ready(BATCH - 1))
        if not self._stop_seen:
            self._write_status()

    def _take_ready(self, limit=None):
        """Events already queued, so that one commit or one fsync covers them all."""
        events = []
        while limit is None or len(events) < limit:
            try:
                kind, item = self.q.get_nowait()
            except queue.Empty:
                return events
            if kind == 'event':
                events.append(item)
            elif kind == 'status':
                self._status = item
            else:
                self._stop_seen = True
                return events
        return events

    def _to_spool(self, events):
        try:
            self.spool.append(events)
        except OSError as exc:
            # Nowhere left to keep them: say exactly what is lost.
            log.error('db writer: cannot write %s (%s); %d event(s) lost: %s', self.spool.path, exc,
                      len(events), ', '.join('%s %s' % (ev['event'], _event_sid(ev)) for ev in events))
            return
        self.spooled += len(events)

    def _connect(self):
        try:
            self.conn = pymysql.connect(**self.params)
        except OUTAGE as exc:
            self._failed('cannot connect', exc)
            return False
        log.info('db writer: connected to %s:%s/%s', self.params['host'], self.params['port'],
                 self.params['database'])
        self.no_segment_table = False
        self._delay = self.retry_min
        return True

    def _close_conn(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except OUTAGE:
                pass

    def _schedule_retry(self):
        self._next_try = time.monotonic() + self._delay
        self._delay = min(self.retry_max, self._delay * 2)

    def _failed(self, what, exc):
        self.last_error, self.last_error_at = '%s: %s' % (what, _describe(exc)), time.time()
        log.warning('db writer: %s: %s; events go to %s until it answers (next try in %.1f s)',
                    what, _describe(exc), self.spool.path, self._delay)
        self._close_conn()
        self._schedule_retry()

    def _reject(self, ev, exc, raw=None):
        self.rejected += 1
        self.last_error, self.last_error_at = 'rejected: %s' % _describe(exc), time.time()
        sid = _event_sid(ev)
        log.error('db writer: speechID=%s: %s event rejected (%s); kept in %s', sid,
                  ev.get('event') if isinstance(ev, dict) else '?', _describe(exc), self.rejected_path)
        _append_line(self.rejected_path, {'error': _describe(exc), 'event': ev} if ev is not None
                     else {'error': _describe(exc), 'raw': raw.decode('utf-8', 'replace') if raw else None})

    def _execute(self, events):
        """Apply events in one transaction (one commit, not one per row). Raises OUTAGE, after which
        none of them counts as written; events that are themselves at fault are rejected."""
        ids, poisoned = [], []
        self.conn.begin()
        with self.conn.cursor() as cur:
            for ev in events:
                segments = ev.get('event') == FINAL and bool((ev.get('payload') or {}).get('segments'))
                try:
                    sql, params = statement(ev)
                    if segments:
                        # The final row and its segments stand or fall together.
                        cur.execute('SAVEPOINT final_event')
                    cur.execute(sql, params)
                    if segments:
                        self._write_segments(cur, ev, cur.lastrowid)
                except POISON + MALFORMED as exc:
                    # InnoDB undid that statement only; the rest of the transaction stands.
                    if segments:
                        cur.execute('ROLLBACK TO SAVEPOINT final_event')
                    poisoned.append((ev, exc))
                    continue
                if ev['event'] == ACCEPTED and cur.lastrowid:
                    ids.append((params[0], cur.lastrowid))
                elif ev['event'] == FINAL:
                    ids.append((params[0], None))
        self.conn.commit()
        for sid, row_id in ids:
            if row_id:
                self.row_ids[sid] = row_id
            else:
                self.row_ids.pop(sid, None)
        for ev, exc in poisoned:
            self._reject(ev, exc)
        return len(events) - len(poisoned)

    def _write_segments(self, cur, ev, task_id):
        """The segment rows of a FINAL event whose task row has id `task_id` (the upsert's
        LAST_INSERT_ID), unless a newer task of the same speechID owns that row."""
        if self.no_segment_table or not task_id:
            return
        rec = TaskRecord.from_dict(ev['payload'])
        cur.execute(SEGMENT_OWNER_SQL, (task_id,))
        row = cur.fetchone()
        if row is None or row[0] > _time(rec.created):
            return
        params, n = segment_params(rec, task_id)
        try:
            cur.execute(SEGMENT_TRIM_SQL, (task_id, n))
            if n:
                cur.execute(segment_sql(n), params)
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] == NO_TABLE:
                self.no_segment_table = True
                log.error('db writer: table task_segment is missing, so segments are not stored (task rows '
                          'are); run "svcmgr.py db init" to add it (checked again at the next connection)')
                return
            raise

    def _apply_or_spool(self, events, reconnect=True):
        for attempt in (1, 2):
            began = time.monotonic()
            try:
                self.written += again_on_deadlock(self.conn, lambda conn: self._execute(events))
                return
            except OUTAGE as exc:
                # A connection the server dropped while idle fails at once and is worth one fresh
                # try; one that timed out says the server is in trouble: leave it to the backoff.
                quick = _lost(exc) and time.monotonic() - began < 1.0
                self._failed('write failed', exc)
                if attempt == 1 and quick and reconnect and self._connect():
                    continue
                self._to_spool(events)
                return

    def _replay(self):
        """Apply the spool from where the last replay stopped, BATCH events per transaction; the
        file goes once all of it is in. False when the database failed again (or we stop)."""
        n, batch, lines, end = 0, [], 0, None
        for ev, raw, end in self.spool.read():
            lines += 1
            if ev is None:
                self._reject(None, ValueError('unreadable spool line'), raw)
            else:
                batch.append(ev)
            if len(batch) >= BATCH:
                if not self._replay_batch(batch, lines, end, n):
                    return False
                n, batch, lines = n + len(batch), [], 0
        if lines and not self._replay_batch(batch, lines, end, n):
            return False
        n += len(batch)
        if not self.spool.clear():
            return False
        if n:
            log.info('db writer: replayed %d spooled event(s); writing directly again', n)
        return True

    def _replay_batch(self, batch, lines, end, done):
        if self._stopping.is_set():
            log.info('db writer: stopping; %d spooled event(s) left for the next start', len(self.spool))
            return False
        try:
            applied = again_on_deadlock(self.conn, lambda conn: self._execute(batch)) if batch else 0
        except OUTAGE as exc:
            self._failed('replay failed after %d event(s)' % done, exc)
            return False
        self.replayed += applied
        self.spool.advance(end, lines)
        return True

    def _write_status(self, info=None):
        """Upsert the node-status row: `info`, or the latest one queued (then it is done)."""
        latest = info is None
        info = self._status if latest else info
        if info is None or self.conn is None:
            return
        info = dict(info, db_queue=self.q.qsize(), db_spooled=len(self.spool))
        try:
            with self.conn.cursor() as cur:
                cur.execute(STATUS_SQL, status_params(info))
        except POISON + MALFORMED as exc:
            log.error('db writer: node status rejected: %s', _describe(exc))
        except OUTAGE as exc:
            # Kept for the next connection; a status is never spooled, the next one replaces it.
            self._failed('node status write failed', exc)
            return
        self._last_status = info
        if latest:
            self._status = None

    def _finish(self):
        events = self._take_ready()
        if events and (self.conn is None or len(self.spool)):
            self._to_spool(events)
        elif events:
            self._apply_or_spool(events, reconnect=False)
        last = self._status or self._last_status
        if self.conn is not None and last is not None:
            self._write_status(dict(last, status='stopped', engine_up=False, tasks_running=0,
                                    tasks_queued=0, updated_at=time.time()))
        self._close_conn()
        log.info('db writer: stopped (%d written, %d replayed, %d spooled, %d left in the spool)',
                 self.written, self.replayed, self.spooled, len(self.spool))


# ---------------------------------------------------------------- svcmgr.py db init / check

def schema_statements(path=SCHEMA_FILE):
    with open(path, encoding='utf-8') as f:
        lines = [line for line in f if not line.lstrip().startswith('--')]
    # A statement ends with ';' at the end of a line; a ';' inside a line (a COMMENT) does not end it.
    return [s.strip() for s in re.split(r';[ \t]*$', ''.join(lines), flags=re.M) if s.strip()]


def schema_columns(path=SCHEMA_FILE):
    """{table: [columns]} as schema.sql declares them."""
    tables = {}
    for stmt in schema_statements(path):
        m = re.match(r'CREATE TABLE IF NOT EXISTS (\w+)\s*\((.*)\)', stmt, re.S)
        if not m:
            continue
        cols = []
        for line in m.group(2).splitlines():
            word = line.strip().split(' ', 1)[0]
            if word and word.upper() not in ('PRIMARY', 'UNIQUE', 'KEY', 'INDEX', 'CONSTRAINT') \
                    and re.fullmatch(r'[a-z_][a-z0-9_]*', word):
                cols.append(word)
        tables[m.group(1)] = cols
    return tables


class DbCommandError(Exception):
    """`db init` or `db check` cannot go on; the message says why and what to do."""


def _name(cfg):
    name = cfg['db']['name']
    if not NAME_RE.match(name):
        raise DbCommandError('[db] name %r: use 1-64 characters of A-Z a-z 0-9 _ $' % name)
    return name


def _where(cfg):
    db = cfg['db']
    return '%s@%s:%s' % (db['user'], db['ip'], db['port'])


def init(cfg, out=print):
    """Create the database if missing and apply schema.sql (idempotent)."""
    name = _name(cfg)
    try:
        conn = pymysql.connect(**connect_params(cfg, database=False))
    except OUTAGE as exc:
        raise DbCommandError('cannot connect to %s: %s' % (_where(cfg), _describe(exc))) from None
    try:
        with conn.cursor() as cur:
            cur.execute('CREATE DATABASE IF NOT EXISTS `%s` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci'
                        % name)
            cur.execute('USE `%s`' % name)
            for stmt in schema_statements():
                cur.execute(stmt)
    except OUTAGE as exc:
        raise DbCommandError('applying %s to %s failed: %s' % (SCHEMA_FILE, name, _describe(exc))) from None
    finally:
        conn.close()
    out('db init: database %s on %s has the schema of %s' % (name, _where(cfg), os.path.basename(SCHEMA_FILE)))


def check(cfg, out=print):
    """Connect, compare tables and columns with schema.sql, print counts; DbCommandError if wrong."""
    name = _name(cfg)
    try:
        conn = pymysql.connect(**connect_params(cfg))
    except OUTAGE as exc:
        hint = '; run "svcmgr.py db init"' if exc.args and exc.args[0] == 1049 else ''
        raise DbCommandError('cannot connect to %s database %s: %s%s'
                             % (_where(cfg), name, _describe(exc), hint)) from None
    problems, lines = [], []
    try:
        with conn.cursor() as cur:
            for table, wanted in schema_columns().items():
                cur.execute('SELECT COLUMN_NAME FROM information_schema.COLUMNS'
                            ' WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s', (name, table))
                have = {row[0] for row in cur.fetchall()}
                if not have:
                    problems.append('table %s is missing' % table)
                    continue
                missing = [c for c in wanted if c not in have]
                if missing:
                    problems.append('table %s lacks column(s) %s' % (table, ', '.join(missing)))
                cur.execute('SELECT TABLE_COLLATION FROM information_schema.TABLES'
                            ' WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s', (name, table))
                collation = cur.fetchone()[0] or ''
                if not collation.startswith('utf8mb4'):
                    problems.append('table %s is %s, not utf8mb4' % (table, collation))
            if not problems:
                cur.execute('SELECT COUNT(*), COUNT(finished_at), COUNT(*) - COUNT(finished_at) FROM task')
                total, final, running = cur.fetchone()
                lines.append('task: %d row(s), %d final, %d not final' % (total, final, running))
                cur.execute('SELECT COUNT(*), COUNT(DISTINCT task_id) FROM task_segment')
                lines.append('task_segment: %d row(s) of %d task(s)' % cur.fetchone())
                cur.execute('SELECT node, status, updated_at FROM node_status ORDER BY node')
                nodes = cur.fetchall()
                lines.append('node_status: %d row(s)' % len(nodes))
                lines += ['  %s %s, updated %s' % row for row in nodes]
    except OUTAGE as exc:
        raise DbCommandError('checking %s failed: %s' % (name, _describe(exc))) from None
    finally:
        conn.close()
    if problems:
        # db init creates missing tables; it never alters an existing one.
        hint = 'run "svcmgr.py db init"' if all(p.endswith('missing') for p in problems) else \
            'db init does not alter existing tables: ALTER them to match %s' % os.path.basename(SCHEMA_FILE)
        raise DbCommandError('database %s does not match %s: %s; %s'
                             % (name, os.path.basename(SCHEMA_FILE), '; '.join(problems), hint))
    out('db check: database %s on %s matches %s' % (name, _where(cfg), os.path.basename(SCHEMA_FILE)))
    for line in lines:
        out(line)


def spool_count(records_dir):
    """Events waiting in the spool, read without touching it (the daemon may be running)."""
    try:
        with open(os.path.join(records_dir, SPOOL_NAME), 'rb') as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def command(cfg, action, records_dir):
    """`svcmgr.py db init|check`; returns the exit status."""
    try:
        if action == 'init':
            init(cfg)
        else:
            check(cfg)
            print('spool: %d event(s) waiting in %s' % (spool_count(records_dir),
                                                         os.path.join(records_dir, SPOOL_NAME)))
    except DbCommandError as exc:
        print('svcmgr db %s: %s' % (action, exc), file=sys.stderr)
        return 1
    if not cfg['db']['enabled']:
        print('note: [db] enabled = false; the daemon does not write to the database')
    return 0
