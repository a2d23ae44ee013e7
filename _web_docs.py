"""/docs: Swagger UI on the web process's own OpenAPI document. Its script and stylesheet come
from the pinned fastapi-offline package (served at /docs/static), never from a CDN; the page
sends the dashboard's bearer token, and without JavaScript it lists the routes as a table.
"""
import html
import os

import fastapi_offline

STATIC_URL = '/docs/static'
STATIC_DIR = os.path.join(os.path.dirname(fastapi_offline.__file__), 'static')

PAGE = '''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%(title)s</title>
<link rel="icon" href="%(static)s/favicon.png"><link rel="stylesheet" href="%(static)s/swagger-ui.css">
</head><body>
<div id="swagger-ui"></div>
<noscript><h1>%(title)s</h1><p>%(description)s The machine-readable document:
<a href="/openapi.json">/openapi.json</a>.</p>
<table><tr><th>Method</th><th>Path</th><th>What</th><th>Statuses</th></tr>%(rows)s</table></noscript>
<script src="%(static)s/swagger-ui-bundle.js"></script>
<script>
// The token as the dashboard keeps it (?token= once, then this browser's storage).
const params = new URLSearchParams(location.search);
const token = params.get('token') || localStorage.getItem('svcmgrToken') || '';
if (params.get('token')) localStorage.setItem('svcmgrToken', token);
window.ui = SwaggerUIBundle({
  url: '/openapi.json', dom_id: '#swagger-ui', deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: 'BaseLayout',
  requestInterceptor: req => {
    if (token && !req.headers.Authorization) req.headers.Authorization = 'Bearer ' + token;
    return req;
  },
});
</script>
</body></html>
'''


def rows(doc):
    out = []
    for path, ops in doc['paths'].items():
        for method, op in ops.items():
            out.append('<tr><td><b>%s</b></td><td><code>%s</code></td><td>%s</td><td>%s</td></tr>' % (
                method.upper(), html.escape(path), html.escape(op.get('summary', '')),
                ', '.join(sorted(op.get('responses', {})))))
    return ''.join(out)


def page(app):
    doc = app.openapi()
    return (PAGE % {'title': html.escape(doc['info']['title']), 'static': STATIC_URL,
                    'description': html.escape(doc['info'].get('description', '')), 'rows': rows(doc)}).encode('utf-8')
