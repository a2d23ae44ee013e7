"""The web process's request handler: routing, bearer tokens, JSON and error bodies, and the
routes themselves: OpenAI-compatible transcription, the task API, health, /metrics, the
dashboard and its data, the OpenAPI document.
"""
import hmac
import json
import logging
import os
import sys
import re
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

import _config
import _openapi
import _web_formats as fmt
import _web_metrics
from _packet import SPEECH_ID_RE, SPEECH_ID_RULE
from _records import stamp
from _states import Result, State
from _web import MasterGone
from _web_upload import BodyError, TooLarge, Upload

log = logging.getLogger('web')

HERE = os.path.dirname(os.path.abspath(__file__))
# Beside the module in a source tree; under <prefix>/share/svcmgr/web when installed with pip.
DASHBOARD = next((p for p in (os.path.join(HERE, 'web', 'dashboard.html'),
                              os.path.join(sys.prefix, 'share', 'svcmgr', 'web', 'dashboard.html'))
                  if os.path.exists(p)), os.path.join(HERE, 'web', 'dashboard.html'))
RETRY_AFTER = '2'
DRAIN_BYTES, DRAIN_SECS = 64 << 20, 5.0
GRANULARITIES = ('word', 'segment')
LANGUAGES = {'pocketsphinx': 'en', 'vosk': 'ko', 'remote': 'ko'}
DECODE_STATES = (State.UNKNOWN_FORMAT.value, State.NOFILE_WAV.value, State.NOFILE_ID.value)


class HTTPError(Exception):
    def __init__(self, status, message, kind='invalid_request_error', code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = headers or {}


def refusal(result, message):
    """The HTTP status of a request the master did not admit (PROTOCOL.md result codes)."""
    result = str(result)
    if result in (Result.TOO_MANY.value, Result.UNAVAILABLE.value):
        return HTTPError(503, message, 'server_error', result, {'Retry-After': RETRY_AFTER})
    if result == Result.ALREADY_CONNECTED.value:
        return HTTPError(409, message, code=result)
    if result == Result.BAD_REQUEST.value and 'outside the allowed roots' in message:
        return HTTPError(403, message, 'permission_error', result)
    return HTTPError(400, message, code=result)


def failure(line):
    """The HTTP error of a task that ended without a transcript."""
    result, state = str(line['data'].get('result')), line.get('state')
    message = line.get('message') or 'the task failed with result %s (%s)' % (result, state)
    sid = {'X-Speech-ID': str(line['data'].get('speechID'))}
    if result == Result.ERROR.value and state in DECODE_STATES:
        return HTTPError(400, message, code=result, headers=sid)
    if result == Result.NOT_FOUND.value:
        return HTTPError(404, message, code=result, headers=sid)
    if result == Result.TIMEOUT.value:
        return HTTPError(504, message, 'server_error', result, sid)
    if result == Result.UNAVAILABLE.value:
        return HTTPError(503, message, 'server_error', result, dict(sid, **{'Retry-After': RETRY_AFTER}))
    return HTTPError(500, message, 'server_error', result, sid)


# ---------------------------------------------------------------- uploads and tasks

def read_upload(h):
    """The multipart body with its file on disk (`.part` removed); HTTPError when unusable."""
    app = h.app
    if not app.uploads.acquire(blocking=False):
        raise HTTPError(503, 'too many uploads at once; try again shortly', 'server_error',
                        Result.TOO_MANY.value, {'Retry-After': RETRY_AFTER})
    up = Upload(app.upload_dir, app.max_upload)
    app.counts['uploads'] += 1
    try:
        up.read(h.rfile, h.headers)
        if not up.path:
            raise BodyError(400, 'the form has no "file" part')
        up.finish()
        h.body_done = True
    except BodyError as exc:
        up.discard()
        if isinstance(exc, TooLarge):
            app.counts['uploadsTooLarge'] += 1
        raise HTTPError(exc.status, exc.message) from None
    except OSError:
        up.discard()
        raise
    finally:
        app.uploads.release()
    return up


def submit(h, req, upload=None):
    """Admit `req` through the master; returns (speechID, waiter) or raises HTTPError."""
    try:
        kind, *rest = h.app.link.submit(req, upload)
    except MasterGone as exc:
        raise HTTPError(503, str(exc), 'server_error', Result.UNAVAILABLE.value, {'Retry-After': RETRY_AFTER})
    if kind != 'admitted':
        raise refusal(*rest)
    h.app.counts['tasks'] += 1
    return rest


def upload_request(up, fields):
    sid = fields.get('speechID') or None
    if sid is not None and not SPEECH_ID_RE.fullmatch(sid):
        raise HTTPError(400, SPEECH_ID_RULE, code=Result.BAD_REQUEST.value)
    req = {'filePath': os.path.dirname(up.path), 'fileID': os.path.basename(up.path),
           'originalName': up.filename[:255], 'domainName': fields.get('domainName', ''),
           'domainCode': fields.get('domainCode', '')}
    if sid:
        req['speechID'] = sid
    return req


def transcriptions(h, match, query):
    up = read_upload(h)
    try:
        f = up.fields
        rformat = f.get('response_format') or 'json'
        if rformat not in fmt.FORMATS:
            raise HTTPError(400, 'response_format must be one of %s' % ', '.join(fmt.FORMATS))
        grans = [g.strip() for g in (f.get('timestamp_granularities[]') or f.get('timestamp_granularities')
                                     or '').split(',') if g.strip()]
        if any(g not in GRANULARITIES for g in grans):
            raise HTTPError(400, 'timestamp_granularities[] takes word and segment')
        language = f.get('language') or LANGUAGES.get(h.app.engine, 'en')
        req = upload_request(up, f)
        req.update(model=f.get('model', '')[:200], language=language[:20])
        sid, waiter = submit(h, req, up.path)
    except HTTPError:
        up.discard()
        raise
    line = wait_end(h, sid, waiter)
    if str(line['data'].get('result')) != Result.OK.value:
        raise failure(line)
    ctype, body = fmt.render(line, rformat, language, grans)
    h.send_body(200, ctype, body, {'X-Speech-ID': sid})


def wait_end(h, sid, waiter):
    if waiter is None or not waiter[0].wait(h.app.timeout + 30) or waiter[1] is None:
        raise HTTPError(504, 'speechID %s did not end in time here; see GET /v1/tasks/%s' % (sid, sid),
                        'server_error')
    return waiter[1]


def create_task(h, match, query):
    ctype = (h.headers.get('Content-Type') or '').lower()
    if ctype.startswith('multipart/'):
        up = read_upload(h)
        try:
            sid, _ = submit(h, upload_request(up, up.fields), up.path)
        except HTTPError:
            up.discard()
            raise
    else:
        body = h.read_json()
        path = body.get('path')
        if not isinstance(path, str) or not os.path.isabs(path):
            raise HTTPError(400, 'path must be an absolute path of a file under the allowed roots')
        real = os.path.realpath(path)
        if not _config.inside(real, h.app.roots) or _config.inside(real, [h.app.upload_dir]):
            raise HTTPError(403, '%s is outside the allowed roots' % path, 'permission_error',
                            Result.BAD_REQUEST.value)
        req = {'filePath': os.path.dirname(path), 'fileID': os.path.basename(path)}
        for key in ('speechID', 'domainName', 'domainCode'):
            if key in body:
                if not isinstance(body[key], str):
                    raise HTTPError(400, '%s must be a string' % key)
                req[key] = body[key]
        if 'speechID' in req and not SPEECH_ID_RE.fullmatch(req['speechID']):
            raise HTTPError(400, SPEECH_ID_RULE, code=Result.BAD_REQUEST.value)
        sid, _ = submit(h, req)
    h.send_json(202, {'speechID': sid, 'state': State.INIT.value, 'href': '/v1/tasks/%s' % sid},
                {'Location': '/v1/tasks/%s' % sid})


def find_task(h, sid):
    """(finished records line or None, running row or None) of a speechID."""
    if not SPEECH_ID_RE.fullmatch(sid):
        raise HTTPError(400, SPEECH_ID_RULE)
    link = h.app.link
    for line in reversed(link.recent):
        if line['data'].get('speechID') == sid:
            return line, None
    for row in h.snapshot()['tasks']:
        if row['speechID'] == sid:
            return None, row
    with link.lock:
        waiter = link.ended.get(sid)
    if waiter is not None and waiter[0].wait(5) and waiter[1] is not None:
        return waiter[1], None      # it ended between the two looks
    line = h.app.find_record(sid)
    if line is None:
        raise HTTPError(404, 'no task with speechID %s' % sid, code=Result.NOT_FOUND.value)
    return line, None


def get_task(h, match, query):
    line, row = find_task(h, match.group(1))
    h.send_json(200, fmt.task_object(line) if line else fmt.running_object(row))


def get_transcript(h, match, query):
    line, row = find_task(h, match.group(1))
    if line is None:
        raise HTTPError(409, 'speechID %s has not ended yet (state %s)' % (row['speechID'], row['state']))
    kind = match.group(2)
    if kind == 'txt':
        kind = 'text'
    ctype, body = fmt.render(line, kind, '')
    h.send_body(200, ctype, body)


def list_tasks(h, match, query):
    state = query.get('state')
    try:
        since = float(query.get('since') or 0)
        limit = int(query.get('limit') or 100)
    except ValueError:
        raise HTTPError(400, 'since is epoch seconds and limit an integer') from None
    if not 0 <= since < 1e11:
        raise HTTPError(400, 'since must be epoch seconds (0 to 1e11)')
    if not 1 <= limit <= 1000:
        raise HTTPError(400, 'limit must be 1 to 1000')
    if state is not None and state not in State.__members__:
        raise HTTPError(400, 'state must be one of %s' % ', '.join(State.__members__))
    out = [fmt.running_object(r) for r in h.snapshot()['tasks'] if r['created'] >= since]
    out.sort(key=lambda t: t['startTime'], reverse=True)
    for line in reversed(h.app.link.recent):
        out.append(fmt.task_object(line))
    if since:
        out = [t for t in out if t['startTime'] and t['startTime'] >= _stamp_of(since)]
    if state:
        out = [t for t in out if t['state'] == state]
    h.send_json(200, {'tasks': out[:limit]})


def _stamp_of(epoch):
    return stamp(epoch)


# ---------------------------------------------------------------- health, metrics, dashboard

def healthz(h, match, query):
    try:
        snap = h.app.link.snapshot(timeout=2, tasks=False)
    except MasterGone as exc:
        h.send_json(503, {'status': 'down', 'web': {'pid': os.getpid()}, 'master': {'answered': False},
                          'problems': [str(exc)]})
        return
    h.send_json(200, {'status': 'ok', 'web': {'pid': os.getpid()},
                      'master': {'answered': True, 'pid': snap['pid']}, 'problems': []})


def readiness(snap):
    problems = []
    engine = snap['engine']
    if not engine['available']:
        problems.append('no engine: %s' % ('no remote engine is logged in' if not engine['embedded']
                                           else 'no worker can take a task'))
    if engine['embedded'] and len(snap['workers']) < snap['workerProcesses']:
        problems.append('%d of %d workers alive' % (len(snap['workers']), snap['workerProcesses']))
    for disk in snap['disk']:
        if disk['percent'] >= 95:
            problems.append('disk %s is %s%% full' % (disk['mount'], disk['percent']))
    if snap['db'].get('enabled') and snap['db'].get('spooled', 0) > 1000:
        problems.append('database spool holds %d rows' % snap['db']['spooled'])
    if snap['outbox'].get('enabled') and snap['outbox'].get('pending', 0) > 1000:
        problems.append('webhook outbox holds %d deliveries' % snap['outbox']['pending'])
    records = snap.get('records') or {}
    if records and not records.get('ok', True):
        problems.append('usage records cannot be written (%s); %d record(s) held'
                        % (records.get('error'), records.get('unwritten', 0)))
    if snap['stopping']:
        problems.append('the service manager is stopping')
    return problems


def readyz(h, match, query):
    try:
        problems = readiness(h.snapshot(timeout=2, tasks=False))
    except HTTPError as exc:
        problems = [exc.message]
    h.send_json(503 if problems else 200, {'ready': not problems, 'problems': problems})


def metrics(h, match, query):
    h.send_body(200, _web_metrics.CONTENT_TYPE, _web_metrics.exposition(h.snapshot(tasks=False)))


def dashboard(h, match, query):
    with open(DASHBOARD, 'rb') as f:
        h.send_body(200, 'text/html; charset=utf-8', f.read(), {'Cache-Control': 'no-store'})


def dashboard_data(h, match, query):
    q = (query.get('q') or '').strip().lower()
    recent = []
    for line in reversed(h.app.link.recent):
        if q and q not in str(line['data'].get('speechID', '')).lower() \
                and q not in str(line['data'].get('transcript', '')).lower():
            continue
        recent.append(fmt.task_object(line))
        if len(recent) >= 50:
            break
    h.send_json(200, {'snapshot': h.snapshot(), 'recent': recent, 'failedWebhooks': h.app.failed_webhooks()})


def redeliver(h, match, query):
    name = match.group(1)
    try:
        new = h.app.redeliver(name)
    except FileNotFoundError:
        raise HTTPError(404, 'no failed webhook delivery named %s' % name) from None
    h.send_json(200, {'name': name, 'outbox': new})


_OPENAPI = []


def openapi(h, match, query):
    if not _OPENAPI:
        _OPENAPI.append(json.dumps(_openapi.document()).encode('utf-8'))
    h.send_body(200, 'application/json', _OPENAPI[0])


def docs(h, match, query):
    h.send_body(200, 'text/html; charset=utf-8', _openapi.html())


ROUTES = [
    ('GET', r'/healthz', healthz), ('GET', r'/docs', docs), ('GET', r'/readyz', readyz), ('GET', r'/metrics', metrics),
    ('GET', r'/', dashboard), ('GET', r'/openapi\.json', openapi),
    ('POST', r'/v1/audio/transcriptions', transcriptions),
    ('POST', r'/v1/tasks', create_task), ('GET', r'/v1/tasks', list_tasks),
    ('GET', r'/v1/tasks/([^/]+)', get_task), ('GET', r'/v1/tasks/([^/]+)/transcript\.(srt|vtt|txt)', get_transcript),
    ('GET', r'/v1/dashboard', dashboard_data),
    ('POST', r'/v1/webhooks/failed/([A-Za-z0-9._:~-]+)/redeliver', redeliver),
]
ROUTES = [(method, re.compile(pattern + r'\Z'), func) for method, pattern, func in ROUTES]
OPEN = ('/healthz',)


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'svcmgr-web'
    # Headers and body go out in two writes: with Nagle on, the body would wait for the
    # client's delayed ACK of the headers (~40 ms per response).
    disable_nagle_algorithm = True
    timeout = 300

    @property
    def app(self):
        return self.server.app

    def log_message(self, form, *args):
        log.debug('web: %s %s', self.address_string(), form % args)

    def do_GET(self):
        self.dispatch('GET')

    def do_POST(self):
        self.dispatch('POST')

    def do_PUT(self):
        self.dispatch('PUT')

    def do_DELETE(self):
        self.dispatch('DELETE')

    def do_PATCH(self):
        self.dispatch('PATCH')

    def __getattr__(self, name):
        # Any other method (HEAD, OPTIONS, TRACE, QUERY, ...) gets 405 or 404, never 501.
        if name.startswith('do_'):
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    def dispatch(self, method):
        self.body_done = not (self.headers.get('Content-Length', '0').strip() not in ('', '0')
                              or self.headers.get('Transfer-Encoding'))
        self.app.counts['requests'] += 1
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            func, match = self.route(method, url.path)
            if url.path not in OPEN and not self.authorized(url.path, query):
                raise HTTPError(401, 'a valid bearer token is required', 'authentication_error',
                                headers={'WWW-Authenticate': 'Bearer'})
            func(self, match, query)
        except HTTPError as exc:
            self.send_error_json(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # the handler's one catch-all: a bug answers 500, the server goes on
            log.error('web: %s %s failed', method, url.path, exc_info=True)
            self.send_error_json(HTTPError(500, 'internal error; see the log', 'server_error'))

    def route(self, method, path):
        allowed = []
        for m, pattern, func in ROUTES:
            match = pattern.match(path)
            if match:
                if m == method:
                    return func, match
                allowed.append(m)
        if allowed:
            raise HTTPError(405, 'method %s not allowed on %s' % (method, path), headers={'Allow': ', '.join(allowed)})
        raise HTTPError(404, 'no such resource: %s' % path)

    def authorized(self, path, query):
        tokens = self.app.tokens
        if not tokens:
            return True
        given = self.headers.get('Authorization') or ''
        token = given[7:].strip() if given[:7].lower() == 'bearer ' else ''
        if not token and path == '/':
            token = query.get('token', '')      # the dashboard page; it sends the token as Bearer after
        token = token.encode('utf-8')
        return any(hmac.compare_digest(token, t) for t in tokens)

    def snapshot(self, timeout=5.0, tasks=True):
        try:
            return self.app.link.snapshot(timeout, tasks)
        except MasterGone as exc:
            raise HTTPError(503, str(exc), 'server_error', Result.UNAVAILABLE.value,
                            {'Retry-After': RETRY_AFTER}) from None

    def read_json(self, limit=1 << 20):
        try:
            n = int(self.headers.get('Content-Length') or 0)
        except ValueError:
            n = -1
        if not 0 < n <= limit:
            self.close_connection = True
            raise HTTPError(400, 'a JSON body of 1 byte to %d bytes with Content-Length is required' % limit)
        data = self.rfile.read(n)
        self.body_done = True
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, 'the body is not JSON') from None
        if not isinstance(body, dict):
            raise HTTPError(400, 'the body must be a JSON object')
        return body

    def send_json(self, status, obj, headers=None):
        self.send_body(status, 'application/json', json.dumps(obj, ensure_ascii=False).encode('utf-8'), headers)

    def send_error_json(self, exc):
        body = {'error': {'message': exc.message, 'type': exc.kind, 'code': exc.code}}
        if exc.status >= 500 and exc.status != 503:
            log.warning('web: %s answered %d: %s', self.path, exc.status, exc.message)
        if not self.body_done:
            self.close_connection = True     # what is left of the body cannot be told from a next request
        try:
            self.send_json(exc.status, body, exc.headers)
        except OSError:
            self.close_connection = True
            return
        if not self.body_done:
            self.drain()

    def send_body(self, status, ctype, body, headers=None):
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def drain(self):
        """After a 413: read what the client still sends (and drop it), so it sees the answer
        instead of a reset connection; bounded in bytes and time."""
        deadline, left = time.monotonic() + DRAIN_SECS, DRAIN_BYTES
        try:
            self.wfile.flush()
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.05, deadline - time.monotonic()))
                data = self.connection.recv(1 << 16)
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass
