"""What the web process's OpenAPI document says (FastAPI builds it from these): the response
models, the error body, the statuses each route answers, and the multipart and JSON request
bodies the routes stream themselves. schemathesis checks every answer against it.
"""
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

SPEECH_ID = {'type': 'string', 'pattern': r'^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}$'}
FORMATS = ['json', 'text', 'srt', 'vtt', 'verbose_json']


class Open(BaseModel):
    """A body that may carry more fields than it names."""
    model_config = ConfigDict(extra='allow')


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: Optional[str] = None


class ErrorBody(BaseModel):
    """Every error: OpenAI's shape; `code` is the PROTOCOL.md result code when there is one."""
    error: ErrorDetail


class Task(Open):
    speechID: str
    state: str
    done: bool
    result: Optional[str] = None
    source: Optional[str] = None
    transcript: Optional[str] = None
    channels: Optional[List[Dict[str, Any]]] = None
    segments: Optional[List[Dict[str, Any]]] = None
    duration: Optional[float] = None
    startTime: Optional[str] = None
    endTime: Optional[str] = None
    timings: Optional[Dict[str, Any]] = None
    message: Optional[str] = None
    worker: Optional[int] = None


class TaskList(BaseModel):
    tasks: List[Task]


class Accepted(BaseModel):
    speechID: str
    state: str
    href: str


class Transcription(Open):
    """json and verbose_json; the other formats are text."""
    text: str
    segments: Optional[List[Dict[str, Any]]] = None
    duration: Optional[float] = None
    language: Optional[str] = None


class Health(Open):
    status: str
    problems: List[str] = Field(default_factory=list)


class Ready(BaseModel):
    ready: bool
    problems: List[str]


class Dashboard(Open):
    snapshot: Dict[str, Any]
    recent: List[Dict[str, Any]]
    failedWebhooks: List[Dict[str, Any]]


class Redelivered(Open):
    name: str
    outbox: Any = None


def errors(*codes):
    """`responses=` entries: each status answers the error body."""
    return {code: {'model': ErrorBody, 'description': 'Error'} for code in codes}


def text_ok(*types, model=None):
    """A 200 whose body is text in one of `types` (and JSON when `model` is given)."""
    out = {200: {'content': {t: {'schema': {'type': 'string'}} for t in types}}}
    if model is not None:
        out[200]['model'] = model
    return out


UPLOAD_FIELDS = {
    'file': {'type': 'string', 'format': 'binary', 'description': 'The audio; its content decides how it is decoded.'},
    'speechID': SPEECH_ID, 'domainName': {'type': 'string'}, 'domainCode': {'type': 'string'}}


def _multipart(schema):
    return {'multipart/form-data': {'schema': schema}}


TRANSCRIPTION_BODY = {'requestBody': {'required': True, 'content': _multipart({
    'type': 'object', 'required': ['file', 'model'], 'properties': dict(UPLOAD_FIELDS, **{
        'model': {'type': 'string', 'description': 'Accepted and recorded; the engine is the one in app.ini.'},
        'language': {'type': 'string'}, 'prompt': {'type': 'string', 'description': 'Ignored.'},
        'response_format': {'type': 'string', 'enum': FORMATS},
        'timestamp_granularities[]': {'type': 'array', 'items': {'type': 'string', 'enum': ['word', 'segment']}}})})}}

TASK_BODY = {'requestBody': {'required': True, 'content': dict(
    {'application/json': {'schema': {'type': 'object', 'required': ['path'], 'properties': {
        'path': {'type': 'string', 'description': 'An absolute path under the allowed roots'},
        'speechID': SPEECH_ID, 'domainName': {'type': 'string'}, 'domainCode': {'type': 'string'}}}}},
    **_multipart({'type': 'object', 'required': ['file'], 'properties': UPLOAD_FIELDS}))}}


def finish(doc):
    """FastAPI's document made ours: bearer auth everywhere but /healthz, and no 422 (a request
    that fails validation is answered 400, which every route declares)."""
    doc.setdefault('components', {}).setdefault('securitySchemes', {})['bearer'] = {'type': 'http', 'scheme': 'bearer'}
    doc['security'] = [{'bearer': []}]
    for path, ops in doc.get('paths', {}).items():
        for op in ops.values():
            op.get('responses', {}).pop('422', None)
            if path == '/healthz':
                op['security'] = []
    for name in ('HTTPValidationError', 'ValidationError'):
        doc['components'].get('schemas', {}).pop(name, None)
    return doc
