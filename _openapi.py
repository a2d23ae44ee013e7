"""The OpenAPI 3.0 document of the web process's API (served at /openapi.json); the tests run
schemathesis against it, so it says every status each route can answer and its body.
"""

SPEECH_ID = {'type': 'string', 'pattern': r'^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}$'}
ERROR = {'type': 'object', 'required': ['error'], 'properties': {'error': {
    'type': 'object', 'required': ['message', 'type'],
    'properties': {'message': {'type': 'string'}, 'type': {'type': 'string'},
                   'code': {'type': 'string', 'nullable': True}}}}}
TASK = {'type': 'object', 'required': ['speechID', 'state', 'done'], 'properties': {
    'speechID': {'type': 'string'}, 'state': {'type': 'string'},
    'result': {'type': 'string', 'nullable': True}, 'source': {'type': 'string', 'nullable': True},
    'transcript': {'type': 'string'}, 'channels': {'type': 'array', 'items': {'type': 'object'}},
    'segments': {'type': 'array', 'items': {'type': 'object'}},
    'duration': {'type': 'number', 'nullable': True}, 'startTime': {'type': 'string', 'nullable': True},
    'endTime': {'type': 'string', 'nullable': True}, 'timings': {'type': 'object'},
    'message': {'type': 'string', 'nullable': True}, 'done': {'type': 'boolean'},
    'worker': {'type': 'integer', 'nullable': True}}}
UPLOAD_FIELDS = {
    'file': {'type': 'string', 'format': 'binary', 'description': 'The audio; its content decides how it is decoded.'},
    'speechID': SPEECH_ID, 'domainName': {'type': 'string'}, 'domainCode': {'type': 'string'}}


def _err(*codes):
    return {str(code): {'description': 'error', 'content': {'application/json': {'schema': ERROR}}} for code in codes}


def _json(schema, description='OK'):
    return {'description': description, 'content': {'application/json': {'schema': schema}}}


def _text(*types):
    return {'description': 'OK', 'content': {t: {'schema': {'type': 'string'}} for t in types}}


def _transcription():
    fields = dict(UPLOAD_FIELDS)
    fields.update({
        'model': {'type': 'string', 'description': 'Accepted and recorded; the engine is the one in app.ini.'},
        'language': {'type': 'string'}, 'prompt': {'type': 'string', 'description': 'Ignored.'},
        'response_format': {'type': 'string', 'enum': ['json', 'text', 'srt', 'vtt', 'verbose_json']},
        'timestamp_granularities[]': {'type': 'array', 'items': {'type': 'string', 'enum': ['word', 'segment']}}})
    ok = {'description': 'The transcript in response_format', 'content': {
        'application/json': {'schema': {'type': 'object', 'required': ['text'], 'properties': {
            'text': {'type': 'string'}, 'segments': {'type': 'array', 'items': {'type': 'object'}},
            'duration': {'type': 'number'}, 'language': {'type': 'string'}}}},
        'text/plain': {'schema': {'type': 'string'}}, 'application/x-subrip': {'schema': {'type': 'string'}},
        'text/vtt': {'schema': {'type': 'string'}}}}
    return {'post': {
        'summary': 'Transcribe an upload (OpenAI-compatible); answers when the task ends',
        'requestBody': {'required': True, 'content': {'multipart/form-data': {'schema': {
            'type': 'object', 'required': ['file', 'model'], 'properties': fields}}}},
        'responses': dict({'200': ok}, **_err(400, 401, 403, 404, 409, 413, 500, 503, 504))}}


def _tasks():
    accepted = _json({'type': 'object', 'required': ['speechID', 'state'], 'properties': {
        'speechID': {'type': 'string'}, 'state': {'type': 'string'}, 'href': {'type': 'string'}}}, 'Accepted')
    by_path = {'type': 'object', 'required': ['path'], 'properties': {
        'path': {'type': 'string', 'description': 'An absolute path under the allowed roots'},
        'speechID': SPEECH_ID, 'domainName': {'type': 'string'}, 'domainCode': {'type': 'string'}}}
    upload = {'type': 'object', 'required': ['file'], 'properties': UPLOAD_FIELDS}
    params = [{'name': 'state', 'in': 'query', 'schema': {'type': 'string'}},
              {'name': 'since', 'in': 'query', 'schema': {'type': 'number'}},
              {'name': 'limit', 'in': 'query', 'schema': {'type': 'integer', 'minimum': 1, 'maximum': 1000}}]
    return {
        'post': {'summary': 'Queue a task (an upload or a path); answers 202 at once',
                 'requestBody': {'required': True, 'content': {'application/json': {'schema': by_path},
                                                               'multipart/form-data': {'schema': upload}}},
                 'responses': dict({'202': accepted}, **_err(400, 401, 403, 409, 413, 503))},
        'get': {'summary': 'Tasks in progress and recently ended, newest first', 'parameters': params,
                'responses': dict({'200': _json({'type': 'object', 'required': ['tasks'], 'properties': {
                    'tasks': {'type': 'array', 'items': TASK}}})}, **_err(400, 401, 503))}}


def document():
    sid = [{'name': 'speechID', 'in': 'path', 'required': True, 'schema': {'type': 'string'}}]
    health = {'type': 'object', 'properties': {'status': {'type': 'string'}, 'problems': {
        'type': 'array', 'items': {'type': 'string'}}}}
    ready = {'type': 'object', 'required': ['ready', 'problems'], 'properties': {
        'ready': {'type': 'boolean'}, 'problems': {'type': 'array', 'items': {'type': 'string'}}}}
    paths = {
        '/v1/audio/transcriptions': _transcription(),
        '/v1/tasks': _tasks(),
        '/v1/tasks/{speechID}': {'get': {'summary': 'One task: state, result, transcript, channels, timings',
                                         'parameters': sid,
                                         'responses': dict({'200': _json(TASK)}, **_err(400, 401, 404, 503))}},
        '/v1/tasks/{speechID}/transcript.{kind}': {'get': {
            'summary': 'The transcript of an ended task as SRT, WebVTT or text',
            'parameters': sid + [{'name': 'kind', 'in': 'path', 'required': True,
                                  'schema': {'type': 'string', 'enum': ['srt', 'vtt', 'txt']}}],
            'responses': dict({'200': _text('application/x-subrip', 'text/vtt', 'text/plain')},
                              **_err(400, 401, 404, 409, 503))}},
        '/healthz': {'get': {'summary': 'The web process and the master answer', 'security': [],
                             'responses': {'200': _json(health), '503': _json(health, 'The master does not answer')}}},
        '/readyz': {'get': {'summary': 'Ready for tasks, or what is wrong',
                            'responses': dict({'200': _json(ready), '503': _json(ready, 'Not ready')}, **_err(401))}},
        '/metrics': {'get': {'summary': 'Prometheus text format',
                             'responses': dict({'200': _text('text/plain')}, **_err(401, 503))}},
        '/v1/dashboard': {'get': {'summary': "The dashboard's data", 'parameters': [
            {'name': 'q', 'in': 'query', 'schema': {'type': 'string'}}],
            'responses': dict({'200': _json({'type': 'object', 'required': ['snapshot', 'recent', 'failedWebhooks']})},
                              **_err(401, 503))}},
        '/v1/webhooks/failed/{name}/redeliver': {'post': {
            'summary': 'Move a failed webhook delivery back into the outbox',
            'parameters': [{'name': 'name', 'in': 'path', 'required': True, 'schema': {'type': 'string'}}],
            'responses': dict({'200': _json({'type': 'object'})}, **_err(401, 404))}},
    }
    return {'openapi': '3.0.3',
            'info': {'title': 'svcmgr HTTP API', 'version': '2.0',
                     'description': 'Batch speech-to-text: OpenAI-compatible transcription, tasks, health, metrics.'},
            'paths': paths,
            'components': {'securitySchemes': {'bearer': {'type': 'http', 'scheme': 'bearer'}}},
            'security': [{'bearer': []}]}


def html():
    """/docs: the document as one plain page (no script, nothing fetched from elsewhere)."""
    import html as _html
    doc = document()
    rows = []
    for path, ops in doc['paths'].items():
        for method, op in ops.items():
            codes = ', '.join(sorted(op['responses']))
            body = ', '.join(sorted((op.get('requestBody') or {}).get('content', {})))
            rows.append('<tr><td><b>%s</b></td><td><code>%s</code></td><td>%s</td><td>%s</td><td>%s</td></tr>' % (
                method.upper(), _html.escape(path), _html.escape(op.get('summary', '')), _html.escape(body), codes))
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>%s</title><style>body{font:14px sans-serif;'
            'margin:20px}td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}</style></head><body>'
            '<h1>%s</h1><p>%s The machine-readable document: <a href="/openapi.json">/openapi.json</a>.</p>'
            '<table><tr><th>Method</th><th>Path</th><th>What</th><th>Body</th><th>Statuses</th></tr>%s</table>'
            '</body></html>' % (doc['info']['title'], doc['info']['title'], _html.escape(doc['info']['description']),
                                ''.join(rows))).encode('utf-8')
