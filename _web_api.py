"""The web process's FastAPI application: bearer tokens, JSON error bodies, and the routes:
OpenAI-compatible transcription, the task API, health, /metrics, the dashboard and its data,
the OpenAPI document and its Swagger UI (served from a pinned package, nothing from elsewhere).
Uploads are read from the ASGI receive channel by _web_upload, never spooled by the framework.
An error may be answered before the client has sent its whole body: uvicorn reads the rest and
drops it (the client sees the answer, not a reset), and a client that asked `Expect: 100-continue`
is answered without sending the body at all.
"""
import contextlib
import hmac
import json
import logging
import os
import re
import sys
from typing import Literal, Optional

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

import _config
import _web_docs
import _web_formats as fmt
import _web_metrics
import _web_models as m
from _packet import SPEECH_ID_RE, SPEECH_ID_RULE
from _records import stamp
from _states import Result, State
from _web import MasterGone
from _web_upload import BodyError, TooLarge, Upload, body_chunks

log = logging.getLogger('web')

HERE = os.path.dirname(os.path.abspath(__file__))
# Beside the module in a source tree; under <prefix>/share/svcmgr/web when installed with pip.
DASHBOARD = next((p for p in (os.path.join(HERE, 'web', 'dashboard.html'),
                              os.path.join(sys.prefix, 'share', 'svcmgr', 'web', 'dashboard.html'))
                  if os.path.exists(p)), os.path.join(HERE, 'web', 'dashboard.html'))
RETRY_AFTER = '2'
JSON_MAX = 1 << 20
# Threads for the routes that block on the master's answer (a few seconds at most): the long
# waits of synchronous transcriptions are awaited on the event loop and hold none.
THREADS = 32
GRANULARITIES = ('word', 'segment')
LANGUAGES = {'pocketsphinx': 'en', 'vosk': 'ko', 'remote': 'ko'}
DECODE_STATES = (State.UNKNOWN_FORMAT.value, State.NOFILE_WAV.value, State.NOFILE_ID.value)
OPEN = ('/healthz',)
QUERY_TOKEN = ('/', '/docs')        # pages a browser opens: ?token= is taken there too
WEBHOOK_NAME = re.compile(r'[A-Za-z0-9._:~-]+')


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
    if result == Result.ALREADY_CONNECTED.value:
        # Cluster mode: admitted here, then refused because the speechID runs on another node.
        return HTTPError(409, message, code=result, headers=sid)
    if result == Result.TIMEOUT.value:
        return HTTPError(504, message, 'server_error', result, sid)
    if result == Result.UNAVAILABLE.value:
        return HTTPError(503, message, 'server_error', result, dict(sid, **{'Retry-After': RETRY_AFTER}))
    return HTTPError(500, message, 'server_error', result, sid)


def json_response(status, obj, headers=None):
    return Response(json.dumps(obj, ensure_ascii=False).encode('utf-8'), status, headers,
                    media_type='application/json')


def web_of(request):
    return request.app.state.web


def unavailable(exc):
    return HTTPError(503, str(exc), 'server_error', Result.UNAVAILABLE.value, {'Retry-After': RETRY_AFTER})


def snapshot(web, timeout=5.0, tasks=True):
    try:
        return web.link.snapshot(timeout, tasks)
    except MasterGone as exc:
        raise unavailable(exc) from None


async def asnapshot(web, timeout=5.0, tasks=True):
    try:
        return await web.link.asnapshot(timeout, tasks)
    except MasterGone as exc:
        raise unavailable(exc) from None


async def authorize(request: Request):
    """Every route but /healthz wants a bearer token once [http] tokens are set (async: a
    dependency that is a plain function would cost every request a trip to the thread pool)."""
    web = web_of(request)
    path = request.url.path
    if not web.tokens or path in OPEN:
        return
    given = request.headers.get('authorization') or ''
    token = given[7:].strip() if given[:7].lower() == 'bearer ' else ''
    if not token and path in QUERY_TOKEN:
        token = request.query_params.get('token', '')   # the page sends it as Bearer after
    token = token.encode('utf-8')
    if not any(hmac.compare_digest(token, t) for t in web.tokens):
        raise HTTPError(401, 'a valid bearer token is required', 'authentication_error',
                        headers={'WWW-Authenticate': 'Bearer'})


# ---------------------------------------------------------------- request bodies

async def read_upload(request):
    """The multipart body with its file on disk (`.part` removed); HTTPError when unusable."""
    web = web_of(request)
    if web.uploading >= web.max_uploads:
        raise HTTPError(503, 'too many uploads at once; try again shortly', 'server_error',
                        Result.TOO_MANY.value, {'Retry-After': RETRY_AFTER})
    web.uploading += 1
    web.counts['uploads'] += 1
    up = Upload(web.upload_dir, web.max_upload)
    kept = False
    try:
        await up.read(request.receive, request.headers)
        if not up.path:
            raise BodyError(400, 'the form has no "file" part')
        up.finish()
        kept = True
    except BodyError as exc:
        if isinstance(exc, TooLarge):
            web.counts['uploadsTooLarge'] += 1
        raise HTTPError(exc.status, exc.message) from None
    finally:
        web.uploading -= 1
        if not kept:
            up.discard()
    return up


async def read_json(request):
    try:
        n = int(request.headers.get('content-length') or 0)
    except ValueError:
        n = -1
    if not 0 < n <= JSON_MAX:
        raise HTTPError(400, 'a JSON body of 1 byte to %d bytes with Content-Length is required' % JSON_MAX)
    data = bytearray()
    try:
        async for chunk in body_chunks(request.receive):
            data += chunk
    except BodyError as exc:
        raise HTTPError(exc.status, exc.message) from None
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, 'the body is not JSON') from None
    if not isinstance(body, dict):
        raise HTTPError(400, 'the body must be a JSON object')
    return body


# ---------------------------------------------------------------- tasks

def submit(web, req, upload=None):
    """Admit `req` through the master (blocking: run in a thread); (speechID, waiter) or HTTPError."""
    try:
        kind, *rest = web.link.submit(req, upload)
    except MasterGone as exc:
        raise unavailable(exc) from None
    if kind != 'admitted':
        raise refusal(*rest)
    web.counts['tasks'] += 1
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


def transcription_request(web, up):
    """(task request, response_format, language, granularities) of an upload's form fields."""
    f = up.fields
    rformat = f.get('response_format') or 'json'
    if rformat not in fmt.FORMATS:
        raise HTTPError(400, 'response_format must be one of %s' % ', '.join(fmt.FORMATS))
    grans = [g.strip() for g in (f.get('timestamp_granularities[]') or f.get('timestamp_granularities')
                                 or '').split(',') if g.strip()]
    if any(g not in GRANULARITIES for g in grans):
        raise HTTPError(400, 'timestamp_granularities[] takes word and segment')
    language = f.get('language') or LANGUAGES.get(web.engine, 'en')
    req = upload_request(up, f)
    req.update(model=f.get('model', '')[:200], language=language[:20])
    return req, rformat, language, grans


async def wait_end(web, sid, waiter):
    if waiter is None or not await waiter[0].until(web.timeout + 30) or waiter[1] is None:
        raise HTTPError(504, 'speechID %s did not end in time here; see GET /v1/tasks/%s' % (sid, sid),
                        'server_error')
    return waiter[1]


def find_task(web, sid):
    """(finished records line or None, running row or None) of a speechID."""
    if not SPEECH_ID_RE.fullmatch(sid):
        raise HTTPError(400, SPEECH_ID_RULE)
    link = web.link
    for line in reversed(link.recent):
        if line['data'].get('speechID') == sid:
            return line, None
    for row in snapshot(web)['tasks']:
        if row['speechID'] == sid:
            return None, row
    with link.lock:
        waiter = link.ended.get(sid)
    if waiter is not None and waiter[0].wait(5) and waiter[1] is not None:
        return waiter[1], None      # it ended between the two looks
    line = web.find_record(sid)
    if line is None:
        raise HTTPError(404, 'no task with speechID %s' % sid, code=Result.NOT_FOUND.value)
    return line, None


api = APIRouter(dependencies=[Depends(authorize)])
UPLOAD_ERRORS = (400, 401, 403, 408, 409, 413, 503)


@api.post('/v1/audio/transcriptions', summary='Transcribe an upload (OpenAI-compatible); answers when the task ends',
          response_model=m.Transcription, openapi_extra=m.TRANSCRIPTION_BODY,
          responses={**m.text_ok('text/plain', 'application/x-subrip', 'text/vtt', model=m.Transcription),
                     **m.errors(*UPLOAD_ERRORS, 404, 500, 504)})
async def transcriptions(request: Request):
    web = web_of(request)
    up = await read_upload(request)
    try:
        req, rformat, language, grans = transcription_request(web, up)
        sid, waiter = await run_in_threadpool(submit, web, req, up.path)
    except HTTPError:
        up.discard()
        raise
    line = await wait_end(web, sid, waiter)
    if str(line['data'].get('result')) != Result.OK.value:
        raise failure(line)
    ctype, body = fmt.render(line, rformat, language, grans)
    return Response(body, 200, {'X-Speech-ID': sid}, media_type=ctype)


def task_by_path(web, body):
    path = body.get('path')
    if not isinstance(path, str) or not os.path.isabs(path):
        raise HTTPError(400, 'path must be an absolute path of a file under the allowed roots')
    real = os.path.realpath(path)
    if not _config.inside(real, web.roots) or _config.inside(real, [web.upload_dir]):
        raise HTTPError(403, '%s is outside the allowed roots' % path, 'permission_error', Result.BAD_REQUEST.value)
    req = {'filePath': os.path.dirname(path), 'fileID': os.path.basename(path)}
    for key in ('speechID', 'domainName', 'domainCode'):
        if key in body:
            if not isinstance(body[key], str):
                raise HTTPError(400, '%s must be a string' % key)
            req[key] = body[key]
    if 'speechID' in req and not SPEECH_ID_RE.fullmatch(req['speechID']):
        raise HTTPError(400, SPEECH_ID_RULE, code=Result.BAD_REQUEST.value)
    return req


@api.post('/v1/tasks', status_code=202, summary='Queue a task (an upload or a path); answers 202 at once',
          response_model=m.Accepted, openapi_extra=m.TASK_BODY, responses=m.errors(*UPLOAD_ERRORS))
async def create_task(request: Request):
    web = web_of(request)
    if (request.headers.get('content-type') or '').lower().startswith('multipart/'):
        up = await read_upload(request)
        try:
            sid, _ = await run_in_threadpool(submit, web, upload_request(up, up.fields), up.path)
        except HTTPError:
            up.discard()
            raise
    else:
        req = task_by_path(web, await read_json(request))
        sid, _ = await run_in_threadpool(submit, web, req)
    return json_response(202, {'speechID': sid, 'state': State.INIT.value, 'href': '/v1/tasks/%s' % sid},
                         {'Location': '/v1/tasks/%s' % sid})


@api.get('/v1/tasks', summary='Tasks in progress and recently ended, newest first', response_model=m.TaskList,
         responses=m.errors(400, 401, 503))
def list_tasks(request: Request, state: Optional[str] = None, since: float = Query(0, ge=0, lt=1e11),
               limit: int = Query(100, ge=1, le=1000)):
    web = web_of(request)
    if state is not None and state not in State.__members__:
        raise HTTPError(400, 'state must be one of %s' % ', '.join(State.__members__))
    out = [fmt.running_object(r) for r in snapshot(web)['tasks'] if r['created'] >= since]
    out.sort(key=lambda t: t['startTime'], reverse=True)
    for line in reversed(web.link.recent):
        out.append(fmt.task_object(line))
    if since:
        out = [t for t in out if t['startTime'] and t['startTime'] >= stamp(since)]
    if state:
        out = [t for t in out if t['state'] == state]
    return json_response(200, {'tasks': out[:limit]})


@api.get('/v1/tasks/{speechID}', summary='One task: state, result, transcript, channels, timings',
         response_model=m.Task, responses=m.errors(400, 401, 404, 503))
def get_task(request: Request, speechID: str):
    line, row = find_task(web_of(request), speechID)
    return json_response(200, fmt.task_object(line) if line else fmt.running_object(row))


@api.get('/v1/tasks/{speechID}/transcript.{kind}', summary='The transcript of an ended task as SRT, WebVTT or text',
         response_class=Response,
         responses={**m.text_ok('application/x-subrip', 'text/vtt', 'text/plain'), **m.errors(400, 401, 404, 409, 503)})
def get_transcript(request: Request, speechID: str, kind: Literal['srt', 'vtt', 'txt']):
    line, row = find_task(web_of(request), speechID)
    if line is None:
        raise HTTPError(409, 'speechID %s has not ended yet (state %s)' % (row['speechID'], row['state']))
    ctype, body = fmt.render(line, 'text' if kind == 'txt' else kind, '')
    return Response(body, 200, media_type=ctype)


# ---------------------------------------------------------------- health, metrics, dashboard

health = APIRouter()


@health.get('/healthz', summary='The web process and the master answer', response_model=m.Health,
            responses={503: {'model': m.Health, 'description': 'The master does not answer'}})
async def healthz(request: Request):
    try:
        snap = await web_of(request).link.asnapshot(timeout=2, tasks=False)
    except MasterGone as exc:
        return json_response(503, {'status': 'down', 'web': {'pid': os.getpid()}, 'master': {'answered': False},
                                   'problems': [str(exc)]})
    return json_response(200, {'status': 'ok', 'web': {'pid': os.getpid()},
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


@api.get('/readyz', summary='Ready for tasks, or what is wrong', response_model=m.Ready,
         responses={503: {'model': m.Ready, 'description': 'Not ready'}, **m.errors(401)})
async def readyz(request: Request):
    try:
        problems = readiness(await asnapshot(web_of(request), timeout=2, tasks=False))
    except HTTPError as exc:
        problems = [exc.message]
    return json_response(503 if problems else 200, {'ready': not problems, 'problems': problems})


@api.get('/metrics', summary='Prometheus text format', response_class=Response, responses={**m.text_ok('text/plain'), **m.errors(401, 503)})
async def metrics(request: Request):
    body = _web_metrics.exposition(await asnapshot(web_of(request), tasks=False))
    return Response(body, 200, media_type=_web_metrics.CONTENT_TYPE)


@api.get('/', include_in_schema=False)
def dashboard():
    with open(DASHBOARD, 'rb') as f:
        return Response(f.read(), 200, {'Cache-Control': 'no-store'}, media_type='text/html; charset=utf-8')


@api.get('/v1/dashboard', summary="The dashboard's data", response_model=m.Dashboard, responses=m.errors(401, 503))
def dashboard_data(request: Request, q: str = ''):
    web = web_of(request)
    q = q.strip().lower()
    recent = []
    for line in reversed(web.link.recent):
        if q and q not in str(line['data'].get('speechID', '')).lower() \
                and q not in str(line['data'].get('transcript', '')).lower():
            continue
        recent.append(fmt.task_object(line))
        if len(recent) >= 50:
            break
    return json_response(200, {'snapshot': snapshot(web), 'recent': recent, 'failedWebhooks': web.failed_webhooks()})


@api.post('/v1/webhooks/failed/{name}/redeliver', summary='Move a failed webhook delivery back into the outbox',
          response_model=m.Redelivered, responses=m.errors(401, 404))
def redeliver(request: Request, name: str):
    try:
        if not WEBHOOK_NAME.fullmatch(name):
            raise FileNotFoundError(name)
        new = web_of(request).redeliver(name)
    except FileNotFoundError:
        raise HTTPError(404, 'no failed webhook delivery named %s' % name) from None
    return json_response(200, {'name': name, 'outbox': new})


@api.get('/openapi.json', include_in_schema=False)
def openapi(request: Request):
    return json_response(200, request.app.openapi())


@api.get('/docs', include_in_schema=False)
def docs(request: Request):
    return Response(_web_docs.page(request.app), 200, media_type='text/html; charset=utf-8')


# ---------------------------------------------------------------- the application

async def on_http_error(request, exc):
    if exc.status >= 500 and exc.status != 503:
        log.warning('web: %s answered %d: %s', request.url.path, exc.status, exc.message)
    return json_response(exc.status, {'error': {'message': exc.message, 'type': exc.kind, 'code': exc.code}},
                         exc.headers)


async def on_invalid(request, exc):
    where = '; '.join('%s: %s' % ('.'.join(str(p) for p in e.get('loc', ())), e.get('msg')) for e in exc.errors())
    return await on_http_error(request, HTTPError(400, 'invalid request: %s' % where))


async def on_starlette(request, exc):
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = 'no such resource: %s' % request.url.path
    elif exc.status_code == 405:
        message = 'method %s not allowed on %s' % (request.method, request.url.path)
        headers['Allow'] = ', '.join(allowed(request))     # Starlette names only the first route's
    else:
        message = str(exc.detail)
    return await on_http_error(request, HTTPError(exc.status_code, message, headers=headers))


def allowed(request):
    """The methods of every route on this path."""
    return sorted({method for router in (health, api) for route in router.routes
                   if route.path_regex.match(request.url.path) for method in route.methods})


async def on_bug(request, exc):
    # The application's one catch-all: a bug answers 500 and the server goes on.
    log.error('web: %s %s failed', request.method, request.url.path, exc_info=exc)
    return json_response(500, {'error': {'message': 'internal error; see the log', 'type': 'server_error',
                                         'code': None}})


class Counted:
    """Counts the requests (the web's status to the master); plain ASGI, so it costs nothing."""

    def __init__(self, app, counts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http':
            self.counts['requests'] += 1
        await self.app(scope, receive, send)


def build(web):
    """The FastAPI application of `web` (_web.Web)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS + web.max_uploads
        yield

    app = FastAPI(title='svcmgr HTTP API', version='2.1',
                  description='Batch speech-to-text: OpenAI-compatible transcription, tasks, health, metrics.',
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.web = web
    app.router.redirect_slashes = False      # /v1/tasks/ is no resource (404), not a redirect
    app.include_router(health)
    app.include_router(api)
    app.mount(_web_docs.STATIC_URL, StaticFiles(directory=_web_docs.STATIC_DIR), name='docs-static')
    app.add_exception_handler(HTTPError, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_starlette)
    app.add_exception_handler(Exception, on_bug)
    app.add_middleware(Counted, counts=web.counts)
    plain = app.openapi

    def document():
        if app.openapi_schema is None:
            app.openapi_schema = m.finish(plain())
        return app.openapi_schema
    app.openapi = document
    logging.getLogger('uvicorn.error').setLevel(logging.WARNING)
    return app
