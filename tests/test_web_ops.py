"""The web process as operators and tools see it: a real Prometheus (Debian's) scraping
/metrics, schemathesis against our own OpenAPI document, and the dashboard in a real
headless Chromium (Debian's, driven by Playwright)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import FIXTURES, expected_texts, free_port, long_wav, wait_for

TOKEN = 'ops-token'
AUTH = {'Authorization': 'Bearer ' + TOKEN}


def start_web(make_daemon, **opts):
    extra = opts.pop('http_extra', '')
    d = make_daemon(http='true', http_extra='tokens = %s\n%s' % (TOKEN, extra), **opts).start()
    d.url = 'http://127.0.0.1:%d' % d.http_port
    wait_up(d.url)
    return d


def wait_up(url):
    def up():
        try:
            return requests.get(url + '/healthz', timeout=2).status_code == 200
        except requests.RequestException:
            return False
    wait_for(up, 30, 'the web process')


def transcribe(d, name):
    with open(os.path.join(FIXTURES, name), 'rb') as f:
        r = requests.post(d.url + '/v1/audio/transcriptions', files={'file': (name, f)}, data={'model': 'm'},
                          headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()['text']


def metric(d, name, **labels):
    text = requests.get(d.url + '/metrics', headers=AUTH).text
    total = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0) + s.value
    return total


def test_prometheus_scrapes_metrics(make_daemon, prometheus_path, tmp_path):
    d = start_web(make_daemon)
    expected = expected_texts()
    assert transcribe(d, 'en_hello.wav') == expected['en_hello.wav']
    assert transcribe(d, 'en_morning.wav') == expected['en_morning.wav']
    # The exposition itself, parsed by prometheus-client's parser.
    assert metric(d, 'svcmgr_tasks_total', source='http', result='0') == 2
    assert metric(d, 'svcmgr_recognition_seconds_count') == 2
    assert metric(d, 'svcmgr_audio_seconds_total') > 3
    assert metric(d, 'svcmgr_max_tasks') == 100 and metric(d, 'svcmgr_workers_alive') == 2
    # Counters are the master's: a worker killed and respawned does not reset them.
    victim = d.workers()[0]
    victim.send_signal(signal.SIGKILL)
    wait_for(lambda: metric(d, 'svcmgr_worker_restarts_total') == 1 and metric(d, 'svcmgr_workers_alive') == 2,
             30, 'the worker respawned')
    assert metric(d, 'svcmgr_tasks_total', source='http', result='0') == 2
    # A real Prometheus server scrapes it with the bearer token and answers a query.
    port = free_port()
    conf = tmp_path / 'prometheus.yml'
    conf.write_text(
        'global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n'
        'scrape_configs:\n  - job_name: svcmgr\n    authorization:\n      credentials: %s\n'
        '    static_configs:\n      - targets: ["127.0.0.1:%d"]\n' % (TOKEN, d.http_port))
    prom = subprocess.Popen([prometheus_path, '--config.file=%s' % conf, '--storage.tsdb.path=%s' % (tmp_path / 'tsdb'),
                             '--web.listen-address=127.0.0.1:%d' % port], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / 'prometheus.log', 'w'))
    try:
        query = 'http://127.0.0.1:%d/api/v1/query?query=%s' % (
            port, urllib.parse.quote('sum(svcmgr_tasks_total{source="http",result="0"})'))

        def answered():
            try:
                res = requests.get(query, timeout=2).json()['data']['result']
            except (requests.RequestException, ValueError, KeyError):
                return None
            return res and float(res[0]['value'][1])
        assert wait_for(answered, 60, 'Prometheus to scrape svcmgr') == 2.0
        targets = requests.get('http://127.0.0.1:%d/api/v1/targets' % port).json()['data']['activeTargets']
        assert targets[0]['health'] == 'up', targets
    finally:
        prom.terminate()
        prom.wait(30)


def test_schemathesis_finds_no_5xx_and_no_schema_breaks(make_daemon, tmp_path):
    d = start_web(make_daemon, timeout=20, http_extra='max_upload_mb = 1\n')
    st = shutil.which('schemathesis', path=os.path.dirname(sys.executable))
    report = tmp_path / 'schemathesis.txt'
    proc = subprocess.run(
        [st, 'run', d.url + '/openapi.json', '-H', 'Authorization: Bearer ' + TOKEN, '--checks',
         'not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,'
         'response_headers_conformance', '--max-examples', '15', '--request-timeout', '60', '--seed', '1'],
        capture_output=True, text=True, timeout=1200, cwd=str(tmp_path))   # its cache folder goes there
    report.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert 'No issues found' in proc.stdout or 'passed' in proc.stdout
    # Whatever schemathesis made tasks of ended with one record each (it reuses speechIDs
    # such as "0" once the earlier task has ended, which is allowed).
    accepted = metric(d, 'svcmgr_tasks_accepted_total') or 0
    recs = d.wait_records(int(accepted)) if accepted else []
    assert len(recs) == accepted > 0
    assert metric(d, 'svcmgr_tasks_total') == accepted


# ---------------------------------------------------------------- dashboard in Chromium

class Receiver:
    """A webhook receiver started late: until then its port refuses, so deliveries fail."""

    def __init__(self, port):
        import http.server
        import threading
        got = self.got = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers['Content-Length']))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_dashboard_in_chromium(make_daemon, chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright
    d = make_daemon(http='true', http_extra='tokens = %s\n' % TOKEN)
    dead = free_port()
    d.write_ini('[webhook]\nurl = http://127.0.0.1:%d/hook\nbackoff_base_secs = 0.05\nbackoff_max_secs = 0.1\n'
                'max_attempts = 1\nrescan_secs = 0.2\nconnect_timeout_secs = 1\n' % dead)
    with open(d.ini) as f:
        ini = f.read().replace('scan_enabled = false', 'scan_enabled = true')
    with open(d.ini, 'w') as f:
        f.write(ini)
    d.start()
    url = 'http://127.0.0.1:%d' % d.http_port
    wait_up(url)
    os.makedirs(d.batch, exist_ok=True)
    long_wav(os.path.join(str(tmp_path), 'call.wav'), 25)
    shutil.move(os.path.join(str(tmp_path), 'call.wav'), os.path.join(d.batch, 'dropped_call.wav'))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=['--no-sandbox'])
        try:
            page = browser.new_page(extra_http_headers=AUTH, locale='en-US')
            page.goto(url + '/')
            row = page.locator('#tasks tr', has_text='dropped_call.wav')
            page.wait_for_function("""() => [...document.querySelectorAll('#tasks tr')].some(r =>
                r.textContent.includes('dropped_call.wav') && r.dataset.done === 'false')""", timeout=60000)
            assert 'running' in row.first.locator('.state').inner_text()
            page.wait_for_function("""() => [...document.querySelectorAll('#tasks tr')].some(r =>
                r.textContent.includes('dropped_call.wav') && r.dataset.done === 'true')""", timeout=120000)
            done = page.locator('#tasks tr[data-done="true"]', has_text='dropped_call.wav')
            assert done.locator('.state').inner_text() == 'DONE'
            assert 'hello customer how can i help you' in done.locator('.text').inner_text()
            # Search by text and by speechID.
            page.fill('#search', 'no such words anywhere')
            page.wait_for_function("() => !document.querySelector('#tasks tr[data-done=\"true\"]')", timeout=10000)
            page.fill('#search', 'customer how can')
            done.wait_for(timeout=10000)
            page.fill('#search', '')
            # The failed webhook delivery of that task, and its Redeliver button.
            button = page.locator('button.redeliver')
            button.first.wait_for(timeout=60000)
            name = button.first.get_attribute('data-name')
            page.screenshot(path=str(tmp_path / 'dashboard.png'), full_page=True)
            failed_dir = os.path.join(d.base, 'records', 'webhook', 'failed')
            assert name in os.listdir(failed_dir)
            receiver = Receiver(dead)       # the receiver is back
            try:
                button.first.click()
                wait_for(lambda: receiver.got, 30, 'the redelivered webhook')
            finally:
                receiver.close()
            assert name not in os.listdir(failed_dir)
            assert d.log_text().count('failed webhook delivery %s redelivered' % name) == 1
            page.wait_for_function("() => !document.querySelector('button.redeliver')", timeout=10000)
            page.locator('#lang').click()
            assert page.locator('h1').inner_text() == 'svcmgr 대시보드'
            # /docs: Swagger UI from the pinned package's files, on our own document, nothing from elsewhere.
            fetched = []
            page.on('request', lambda req: fetched.append(req.url))
            page.goto(url + '/docs')
            page.wait_for_selector('.opblock', timeout=30000)
            assert page.locator('.opblock').count() >= 9
            assert fetched and all(u.startswith(url + '/') for u in fetched), fetched
        finally:
            browser.close()
    assert (tmp_path / 'dashboard.png').stat().st_size > 10000
    print('dashboard screenshot: %s' % (tmp_path / 'dashboard.png'))
