"""The web process on a real daemon over real HTTP: the official openai package in every
response_format, the task API, bad inputs with their status codes, one record per accepted
task, and the web process killed with SIGKILL in the middle of an upload."""
import concurrent.futures
import json
import os
import signal
import socket
import time

import openai
import psutil
import pytest
import requests
import srt
import webvtt

from _children import title_of
from conftest import FIXTURES, Daemon, expected_texts, long_wav, wait_for

TOKEN = 'test-token-1'
AUTH = {'Authorization': 'Bearer ' + TOKEN}


def web_process(d):
    for p in d.processes()[1:]:
        try:
            if title_of(p) == 'svcmgr: web':
                return p
        except psutil.NoSuchProcess:
            pass
    return None


def wait_web(d, base, timeout=30):
    def up():
        try:
            return requests.get(base + '/healthz', timeout=2).status_code == 200
        except requests.RequestException:
            return False
    wait_for(up, timeout, 'the web process to answer')


@pytest.fixture(scope='module')
def web(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp('web'), http='true', max_tasks=3, workers=2, timeout=120,
               http_extra='tokens = %s\nmax_upload_mb = 1\nmax_uploads = 4\n' % TOKEN).start()
    d.url = 'http://127.0.0.1:%d' % d.http_port
    d.sids = []                 # every task the web accepted
    wait_web(d, d.url)
    yield d
    d.stop()


def client(d):
    return openai.OpenAI(base_url=d.url + '/v1', api_key=TOKEN, max_retries=0, timeout=120)


def upload_dir(d):
    return os.path.join(d.data, 'uploads')


def test_openai_package_in_every_format(web):
    expected = expected_texts()
    c = client(web)
    path = os.path.join(FIXTURES, 'en_hello.wav')
    with open(path, 'rb') as f:
        r = c.audio.transcriptions.with_raw_response.create(model='whisper-1', file=f)
    web.sids.append(r.headers['x-speech-id'])
    assert r.parse().text == expected['en_hello.wav']
    with open(path, 'rb') as f:
        text = c.audio.transcriptions.create(model='whisper-1', file=f, response_format='text')
    assert text.strip() == expected['en_hello.wav']
    with open(path, 'rb') as f:
        subs = list(srt.parse(c.audio.transcriptions.create(model='whisper-1', file=f, response_format='srt')))
    assert [s.content for s in subs] == [expected['en_hello.wav']]
    # The cue is the utterance the engine heard: inside the 2.421 s file, around the speech.
    assert 0 <= subs[0].start.total_seconds() < 0.5 and 1.5 < subs[0].end.total_seconds() <= 2.43, subs
    with open(path, 'rb') as f:
        vtt = webvtt.from_string(c.audio.transcriptions.create(model='whisper-1', file=f, response_format='vtt'))
    assert [cap.text for cap in vtt.captions] == [expected['en_hello.wav']]
    with open(path, 'rb') as f:
        verbose = c.audio.transcriptions.create(model='whisper-1', file=f, response_format='verbose_json',
                                                language='en', timestamp_granularities=['segment'])
    assert verbose.text == expected['en_hello.wav'] and verbose.language == 'en'
    assert abs(verbose.duration - 2.421) < 0.01 and verbose.segments[0].text == expected['en_hello.wav']
    web.sids += [s for s in records_sids(web) if s not in web.sids]


def test_stereo_verbose_json_has_per_channel_segments(web):
    expected = expected_texts()['stereo_call.wav']
    with open(os.path.join(FIXTURES, 'stereo_call.wav'), 'rb') as f:
        r = client(web).audio.transcriptions.with_raw_response.create(model='m', file=f, response_format='verbose_json')
    web.sids.append(r.headers['x-speech-id'])
    body = json.loads(r.text)
    by_channel = {}
    for seg in body['segments']:
        by_channel.setdefault(seg['channel'], []).append(seg['text'])
    assert ' '.join(by_channel['A']) == expected['A'] and ' '.join(by_channel['B']) == expected['B']
    with open(os.path.join(FIXTURES, 'stereo_call.wav'), 'rb') as f:
        subs = list(srt.parse(client(web).audio.transcriptions.create(model='m', file=f, response_format='srt')))
    assert {s.content.split(':')[0] for s in subs} == {'A', 'B'}
    web.sids += [s for s in records_sids(web) if s not in web.sids]


def test_upload_is_sniffed_not_trusted_by_its_name(web):
    # MP3 bytes under a .wav name, and under no extension at all: PyAV decides by the content.
    for name in ('call.wav', 'noextension'):
        with open(os.path.join(FIXTURES, 'fmt_mp3.mp3'), 'rb') as f:
            r = client(web).audio.transcriptions.with_raw_response.create(model='m', file=(name, f.read()))
        web.sids.append(r.headers['x-speech-id'])
        assert r.parse().text == expected_texts()['fmt_mp3.mp3']


def records_sids(d):
    return [r['data']['speechID'] for r in d.records() if r.get('source') == 'http']


def test_task_api(web):
    folder, name = web.fixture('en_morning.wav')
    r = requests.post(web.url + '/v1/tasks', json={'path': os.path.join(folder, name), 'speechID': 'api-task-1'},
                      headers=AUTH)
    assert r.status_code == 202 and r.json()['speechID'] == 'api-task-1'
    web.sids.append('api-task-1')
    done = wait_for(lambda: requests.get(web.url + '/v1/tasks/api-task-1', headers=AUTH).json().get('done')
                    and requests.get(web.url + '/v1/tasks/api-task-1', headers=AUTH).json(), 60, 'the task to end')
    assert done['state'] == 'DONE' and done['transcript'] == 'good morning' and done['source'] == 'http'
    assert 'TRANSCRIBE_END' in done['timings']
    vtt = requests.get(web.url + '/v1/tasks/api-task-1/transcript.vtt', headers=AUTH)
    assert [c.text for c in webvtt.from_string(vtt.text).captions] == ['good morning']
    txt = requests.get(web.url + '/v1/tasks/api-task-1/transcript.txt', headers=AUTH)
    assert txt.text.strip() == 'good morning'
    listed = requests.get(web.url + '/v1/tasks?state=DONE&limit=5', headers=AUTH).json()['tasks']
    assert 'api-task-1' in [t['speechID'] for t in listed] and all(t['state'] == 'DONE' for t in listed)
    with open(os.path.join(FIXTURES, 'en_email.wav'), 'rb') as f:
        r = requests.post(web.url + '/v1/tasks', files={'file': ('x.wav', f)}, data={'speechID': 'api-upload-1'},
                          headers=AUTH)
    assert r.status_code == 202
    web.sids.append('api-upload-1')
    wait_for(lambda: requests.get(web.url + '/v1/tasks/api-upload-1', headers=AUTH).json().get('done'), 60, 'upload')
    assert requests.get(web.url + '/v1/tasks/api-upload-1', headers=AUTH).json()['transcript'] == \
        'we will send you an email'
    assert requests.get(web.url + '/v1/tasks/nope-404', headers=AUTH).status_code == 404
    docs = requests.get(web.url + '/docs', headers=AUTH)
    assert docs.status_code == 200 and '/v1/audio/transcriptions' in docs.text
    assert requests.get(web.url + '/openapi.json', headers=AUTH).json()['openapi'].startswith('3.')
    wait_for(lambda: not os.listdir(upload_dir(web)), 10, 'uploads removed after their tasks')


def error_of(r):
    return r.json()['error']['message']


def test_bad_inputs(web):
    base = web.url
    # No token: 401 everywhere but /healthz.
    assert requests.get(base + '/healthz').status_code == 200
    r = requests.get(base + '/metrics')
    assert r.status_code == 401 and r.headers['WWW-Authenticate'] == 'Bearer'
    with pytest.raises(openai.AuthenticationError):
        with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
            openai.OpenAI(base_url=base + '/v1', api_key='wrong', max_retries=0).audio.transcriptions.create(
                model='m', file=f)
    # Over max_upload_mb (1): 413 by Content-Length, nothing kept.
    big = b'RIFF' + os.urandom(3 << 20)
    r = requests.post(base + '/v1/audio/transcriptions', files={'file': ('big.wav', big)}, data={'model': 'm'},
                      headers=AUTH)
    assert r.status_code == 413 and 'max_upload_mb' in error_of(r)
    # ... and when the length is not known ahead (chunked): cut off while streaming.
    r = requests.post(base + '/v1/audio/transcriptions', data=chunked_multipart(big), headers=dict(
        AUTH, **{'Content-Type': 'multipart/form-data; boundary=XyZ'}))
    assert r.status_code == 413
    assert os.listdir(upload_dir(web)) == []
    # Undecodable audio: a task that ends with result 9, answered 400 with its message.
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        r = requests.post(base + '/v1/audio/transcriptions', files={'file': ('noise.wav', b'not audio at all' * 100)},
                          data={'model': 'm'}, headers=AUTH)
    assert r.status_code == 400 and r.json()['error']['code'] == '9', r.text
    web.sids.append(r.headers['X-Speech-ID'])
    # A path outside the roots: 403; a bad response_format and a bad speechID: 400.
    r = requests.post(base + '/v1/tasks', json={'path': '/etc/passwd'}, headers=AUTH)
    assert r.status_code == 403 and 'outside the allowed roots' in error_of(r)
    r = requests.post(base + '/v1/tasks', json={'path': os.path.join(web.data, '..', '..', 'x.wav')}, headers=AUTH)
    assert r.status_code == 403
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        r = requests.post(base + '/v1/audio/transcriptions', files={'file': f},
                          data={'model': 'm', 'response_format': 'docx'}, headers=AUTH)
    assert r.status_code == 400 and 'response_format' in error_of(r)
    r = requests.post(base + '/v1/tasks', json={'path': os.path.join(web.data, 'a.wav'), 'speechID': '../x'},
                      headers=AUTH)
    assert r.status_code == 400 and 'speechID' in error_of(r)
    assert requests.post(base + '/v1/tasks', data=b'{', headers=dict(AUTH, **{'Content-Type': 'application/json'})
                         ).status_code == 400
    assert os.listdir(upload_dir(web)) == []


def chunked_multipart(payload):
    yield b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
    yield b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    for i in range(0, len(payload), 1 << 16):
        yield payload[i:i + (1 << 16)]
    yield b'\r\n--XyZ--\r\n'


def test_too_many_uploads_at_once_is_503_with_retry_after(web):
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    held = []
    for _ in range(4):          # max_uploads = 4, each stalled half-way through its body
        sock = socket.create_connection(('127.0.0.1', web.http_port))
        sock.sendall(b'POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n'
                     b'Content-Type: multipart/form-data; boundary=B\r\nContent-Length: %d\r\n\r\n'
                     % (TOKEN.encode(), len(head) + 100000) + head + b'\0' * 1000)
        held.append(sock)
    try:
        wait_for(lambda: len([n for n in os.listdir(upload_dir(web)) if n.endswith('.part')]) == 4, 10, '4 uploads')
        with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
            r = requests.post(web.url + '/v1/audio/transcriptions', files={'file': f}, data={'model': 'm'},
                              headers=AUTH)
        assert r.status_code == 503 and r.headers['Retry-After'] == '2' and 'too many uploads' in error_of(r)
    finally:
        for sock in held:
            sock.close()        # cut short: each is answered 400 and its .part removed
    wait_for(lambda: os.listdir(upload_dir(web)) == [], 10, 'partial uploads removed')
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        r = requests.post(web.url + '/v1/audio/transcriptions', files={'file': f}, data={'model': 'm'}, headers=AUTH)
    assert r.status_code == 200
    web.sids.append(r.headers['X-Speech-ID'])


def test_too_many_tasks_is_503_with_retry_after(web, tmp_path):
    path = long_wav(os.path.join(web.data, 'long.wav'), 20)
    sids = []
    for i in range(3):
        r = requests.post(web.url + '/v1/tasks', json={'path': path, 'speechID': 'busy-%d' % i}, headers=AUTH)
        assert r.status_code == 202, r.text
        sids.append('busy-%d' % i)
    web.sids += sids
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        r = requests.post(web.url + '/v1/audio/transcriptions', files={'file': f}, data={'model': 'm'}, headers=AUTH)
    assert r.status_code == 503 and r.headers['Retry-After'] == '2' and r.json()['error']['code'] == '6'
    assert 'max_tasks' in error_of(r)
    r = requests.post(web.url + '/v1/tasks', json={'path': path, 'speechID': 'busy-0'}, headers=AUTH)
    assert r.status_code in (409, 503)
    running = requests.get(web.url + '/v1/tasks/busy-2', headers=AUTH).json()
    assert running['done'] is False and running['state'] in ('INIT', 'CONVERT', 'RECOGNIZE')
    for sid in sids:
        wait_for(lambda: requests.get(web.url + '/v1/tasks/' + sid, headers=AUTH).json().get('done'), 120, sid)
    wait_for(lambda: not os.listdir(upload_dir(web)), 10, 'uploads removed')


def test_every_accepted_task_has_one_record(web):
    wait_for(lambda: set(web.sids) <= set(records_sids(web)), 60,
             'records of every accepted task (missing %s)' % (set(web.sids) - set(records_sids(web))))
    sids = records_sids(web)
    assert len(sids) == len(set(sids))
    metrics = requests.get(web.url + '/metrics', headers=AUTH).text
    ended = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('svcmgr_tasks_total{') and 'source="http"' in line)
    assert ended == len(sids)


def test_web_killed_mid_upload_is_respawned(make_daemon):
    d = make_daemon(http='true', http_extra='max_upload_mb = 50\n').start()
    base = 'http://127.0.0.1:%d' % d.http_port
    wait_web(d, base)
    master, web_before = d.pid, web_process(d)
    path = long_wav(os.path.join(d.data, 'long.wav'), 20)
    r = requests.post(base + '/v1/tasks', json={'path': path, 'speechID': 'survivor'})
    assert r.status_code == 202
    workers_before = {p.pid for p in d.workers()}
    sock = socket.create_connection(('127.0.0.1', d.http_port))
    head = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n')
    sock.sendall(b'POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; '
                 b'boundary=B\r\nContent-Length: %d\r\n\r\n' % (len(head) + (10 << 20)) + head + os.urandom(1 << 20))
    part = wait_for(lambda: [n for n in os.listdir(os.path.join(d.data, 'uploads')) if n.endswith('.part')], 10,
                    'the partial upload on disk')
    web_before.send_signal(signal.SIGKILL)
    web_after = wait_for(lambda: (lambda p: p if p and p.pid != web_before.pid else None)(web_process(d)), 30,
                         'a new web process')
    wait_web(d, base)
    sock.close()
    assert not os.path.exists(os.path.join(d.data, 'uploads', part[0]))
    assert d.pid == master and {p.pid for p in d.workers()} == workers_before
    rec = wait_for(lambda: [r for r in d.records() if r['data']['speechID'] == 'survivor'], 120, 'the task record')
    assert rec[0]['state'] == 'DONE' and len(d.records()) == 1
    assert 'web (pid %d) died with signal 9' % web_before.pid in d.log_text()
    assert web_after.pid != web_before.pid


def test_waiting_transcriptions_hold_no_thread(make_daemon):
    """More synchronous transcriptions waiting for their task than a thread pool has threads
    (anyio's default is 40): they wait on the event loop, so other requests are answered at once."""
    n = 42
    d = make_daemon(http='true', workers=2, timeout=300, http_extra='max_uploads = 64\n').start()
    base = 'http://127.0.0.1:%d' % d.http_port
    wait_web(d, base)
    workers = d.workers()
    for w in workers:
        w.suspend()             # SIGSTOP: the first tasks stay running, the others queued
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        audio = f.read()

    def one(i):
        return requests.post(base + '/v1/audio/transcriptions', files={'file': ('a.wav', audio)},
                             data={'model': 'm'}, timeout=300)

    def admitted():
        r = requests.get(base + '/v1/tasks?limit=1000', timeout=10).json()['tasks']
        return len([t for t in r if not t['done']]) >= n
    pool = concurrent.futures.ThreadPoolExecutor(n)
    try:
        futures = [pool.submit(one, i) for i in range(n)]
        wait_for(admitted, 60, '%d tasks waiting' % n)
        # The pool's threads that ran the admissions retire once idle for 10 s (anyio prunes them
        # when the pool is next used); the waits hold none.
        web = web_process(d)
        wait_for(lambda: admitted() and web.num_threads() < 12, 40, 'no thread held by a waiting request',
                 interval=1)
        t = time.perf_counter()
        assert requests.get(base + '/healthz', timeout=5).status_code == 200
        assert requests.get(base + '/v1/tasks?limit=5', timeout=5).status_code == 200
        assert time.perf_counter() - t < 2
    finally:
        for w in workers:
            w.resume()
    assert [f.result().status_code for f in futures] == [200] * n
    pool.shutdown()


def test_waiter_wakes_a_thread_and_the_event_loop():
    import asyncio
    import threading
    from _web import Waiter
    w = Waiter()

    async def main():
        threading.Timer(0.05, w.set).start()        # the link's reader thread, in the web process
        assert await w.until(5) is True
        assert await w.until(1) is True             # already set
        late = Waiter()
        assert await late.until(0.05) is False and late._callbacks == []
        late.set()                                  # after its waiter gave up: nothing to wake
    asyncio.run(main())
    assert w.wait(0)


def write_app_ini(tmp_path, http):
    ini = tmp_path / 'app.ini'
    ini.write_text('[directory]\nscan_enabled = false\n[http]\n' + http)
    return str(ini)


def test_http_settings_are_checked_at_load(tmp_path, monkeypatch):
    import _config
    with pytest.raises(_config.ConfigError) as err:
        _config.load(write_app_ini(tmp_path, 'ip = 0.0.0.0\n'))
    assert 'not loopback' in str(err.value) and '[http] tokens' in str(err.value)
    monkeypatch.setenv('SVCMGR_TEST_TOKENS', 'a, b')
    cfg = _config.load(write_app_ini(tmp_path, 'ip = 0.0.0.0\ntoken_env = SVCMGR_TEST_TOKENS\n'))
    assert cfg['http']['tokens'] == ['a', 'b']
    cfg = _config.load(write_app_ini(tmp_path, 'enabled = false\nip = 0.0.0.0\n'))
    assert cfg['http']['enabled'] is False
    # Uploads are readable by tasks without widening allowed_roots.
    cfg = _config.load(write_app_ini(tmp_path, 'upload_path = up\n'))
    assert str(tmp_path / 'up') in _config.task_roots(cfg)
    assert str(tmp_path / 'up') not in cfg['directory']['allowed_roots']
    ini = tmp_path / 'app.ini'
    ini.write_text('[directory]\nscan_enabled = true\naudio_source_path = batch\n[http]\nupload_path = batch/up\n')
    with pytest.raises(_config.ConfigError) as err:
        _config.load(str(ini))
    assert 'audio_source_path' in str(err.value)


def test_non_loopback_without_token_refuses_to_start(make_daemon):
    d = make_daemon(http='true')
    d.write_ini()
    with open(d.ini) as f:
        text = f.read().replace('[http]\nenabled = true\nip = 127.0.0.1', '[http]\nenabled = true\nip = 0.0.0.0')
    with open(d.ini, 'w') as f:
        f.write(text)
    proc = d.cli('start')
    assert proc.returncode != 0 and 'not loopback' in proc.stdout + proc.stderr
    assert d.processes() == []


def test_readyz_says_what_is_wrong(make_daemon):
    d = make_daemon(http='true', engine='remote').start()
    url = 'http://127.0.0.1:%d' % d.http_port
    wait_web(d, url)
    r = requests.get(url + '/readyz')
    assert r.status_code == 503 and r.json()['ready'] is False
    assert any('no remote engine is logged in' in p for p in r.json()['problems'])
    assert requests.get(url + '/healthz').json()['master']['answered'] is True
    # An upload with no engine to take it: 503 with Retry-After (result 3), nothing kept.
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        r = requests.post(url + '/v1/audio/transcriptions', files={'file': f}, data={'model': 'm'})
    assert r.status_code == 503 and r.headers['Retry-After'] and r.json()['error']['code'] == '3'
    assert os.listdir(os.path.join(d.data, 'uploads')) == []
    assert d.records() == []


def test_sighup_moves_the_web_process_to_its_new_settings(make_daemon):
    from conftest import free_port
    d = make_daemon(http='true').start()
    old_url = 'http://127.0.0.1:%d' % d.http_port
    wait_web(d, old_url)
    before = web_process(d)
    d.opts['http_port'] = free_port()
    d.write_ini()
    os.kill(d.pid, signal.SIGHUP)
    new_url = 'http://127.0.0.1:%d' % d.opts['http_port']
    wait_web(d, new_url)
    after = web_process(d)
    assert after.pid != before.pid and not before.is_running()
    with pytest.raises(requests.ConnectionError):
        requests.get(old_url + '/healthz', timeout=2)
    with open(os.path.join(FIXTURES, 'en_hello.wav'), 'rb') as f:
        r = requests.post(new_url + '/v1/audio/transcriptions', files={'file': f}, data={'model': 'm'})
    assert r.json()['text'] == expected_texts()['en_hello.wav']
    log = d.log_text()
    assert 'web (pid %d) ended with exit status 0' % before.pid in log
    assert 'web (pid %d) died' % before.pid not in log
