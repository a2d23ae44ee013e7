"""Tests of `svcmgr transcribe` (_client.py, _outputs.py) as an operator runs it: the real
CLI against the real daemon, on folders, past max_tasks with the daemon full (sent again on
6, never shown), outputs written, a progress line on a pseudo-terminal, errors that name
what to change, and exit codes."""
import glob
import json
import os
import pty
import select
import shutil
import subprocess
import sys

import _outputs
from conftest import FIXTURES, ROOT, expected_texts, long_wav, transcribe_req, wait_for
from helpers import Closing, free_port, monitor

TEXTS = expected_texts()
EN = sorted(n for n in os.listdir(FIXTURES) if n.startswith('en_') and n.endswith('.wav'))


def copies(folder, n, nested=True):
    """n fixture copies in `folder` (in two subfolders when nested); {path: expected text}."""
    out = {}
    for i in range(n):
        sub = os.path.join(folder, 'day%d' % (i % 2)) if nested else folder
        os.makedirs(sub, exist_ok=True)
        name = EN[i % len(EN)]
        path = os.path.join(sub, 'call%03d_%s' % (i, name))
        shutil.copy(os.path.join(FIXTURES, name), path)
        out[path] = TEXTS[name]
    return out


def run_on_pty(argv, timeout=300):
    """Run argv with stdout and stderr on a pseudo-terminal; (exit status, everything shown)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    shown = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            assert ready, 'no output for %d s' % timeout
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:         # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        return proc.wait(timeout=timeout), shown.decode('utf-8', 'replace')
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


# ================================================================== units

def test_expand_walks_folders_and_plans_outputs_without_collisions(tmp_path):
    (tmp_path / 'in' / 'a').mkdir(parents=True)
    for name in ('a/x.wav', 'a/x.mp3', 'y.WAV', 'notes.txt', '.hidden.wav'):
        (tmp_path / 'in' / name).write_bytes(b'1')
    single = str(tmp_path / 'single.wav')
    items = _outputs.expand([str(tmp_path / 'in'), single], None, ['wav', 'mp3'])
    assert [rel for _, rel in items] == ['y.WAV', 'a/x.mp3', 'a/x.wav', 'single.wav']
    assert _outputs.expand([str(tmp_path / 'in')], '*.txt', ['wav']) == [(str(tmp_path / 'in' / 'notes.txt'),
                                                                         'notes.txt')]
    plan = _outputs.plan_outputs(items, 'srt', out_dir=str(tmp_path / 'out'))
    assert plan[str(tmp_path / 'in' / 'y.WAV')] == str(tmp_path / 'out' / 'y.srt')
    assert plan[str(tmp_path / 'in' / 'a' / 'x.wav')] == str(tmp_path / 'out' / 'a' / 'x.wav.srt')   # x.mp3 too
    assert plan[single] == str(tmp_path / 'out' / 'single.srt')
    assert _outputs.plan_outputs(items, 'text', beside=True)[single] == str(tmp_path / 'single.txt')


def test_srt_vtt_from_segments_or_one_cue_for_the_call():
    body = {'transcript': 'hello there', 'duration': 3.5}
    assert _outputs.render('srt', 'f', body) == '1\n00:00:00,000 --> 00:00:03,500\nhello there\n'
    seg = dict(body, segments=[{'start': 0.25, 'end': 1.0, 'text': 'hello'}, {'start': 61.5, 'end': 62, 'text': 'x'}])
    assert _outputs.render('vtt', 'f', seg) == ('WEBVTT\n\n00:00:00.250 --> 00:00:01.000\nhello\n\n'
                                                '00:01:01.500 --> 00:01:02.000\nx\n')
    assert json.loads(_outputs.render('json', 'f', body)) == {'file': 'f', 'transcript': 'hello there',
                                                              'duration': 3.5}


# ================================================================== the real daemon

def test_a_folder_past_max_tasks_with_the_daemon_full_never_shows_6(make_daemon):
    d = make_daemon(workers=1, max_tasks=2).start()
    # Fill the daemon: two long calls take both max_tasks places, so the CLI's first sends get 6.
    longs = [long_wav(os.path.join(d.data, 'long%d.wav' % i), 20) for i in range(2)]
    with Closing(d.client()) as filler:
        for path in longs:
            filler.send(1002, transcribe_req(d.data, os.path.basename(path), keepSource=True))
        wait_for(lambda: monitor(d)['queue']['pending'] + monitor(d)['queue']['running'] == 2, 30, 'daemon full')
        files = copies(os.path.join(d.data, 'calls'), 12)
        out = os.path.join(d.base, 'out')
        r = d.cli('transcribe', '--format', 'json', '--out', out, os.path.join(d.data, 'calls'), timeout=300)
        filler.recv_n(2, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert 'ERROR' not in r.stdout and '\r' not in r.stderr                    # no TTY: no progress line
    assert r.stderr.strip().endswith('12 file(s): 12 OK'), r.stderr
    assert monitor(d)['counters']['rejected'] >= 1                             # 6s happened, and were sent again
    for path, text in files.items():
        rel = os.path.relpath(path, os.path.join(d.data, 'calls'))
        with open(os.path.join(out, os.path.splitext(rel)[0] + '.json'), encoding='utf-8') as f:
            doc = json.load(f)
        assert doc['file'] == path and doc['result'] == '0' and doc['transcript'] == text
        assert '%s\t-> %s' % (path, os.path.join(out, os.path.splitext(rel)[0] + '.json')) in r.stdout
        assert os.path.exists(path)                                             # kept by default
    recs = d.wait_records(14)
    assert len(recs) == 14 and all(rec['data']['result'] == '0' for rec in recs)


def test_progress_line_on_a_terminal_and_srt_beside(make_daemon):
    d = make_daemon(workers=2).start()
    files = copies(os.path.join(d.data, 'tty'), 6, nested=False)
    status, shown = run_on_pty([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '-c', d.ini, 'transcribe',
                                '--format', 'srt', '--beside', os.path.join(d.data, 'tty')])
    assert status == 0, shown
    assert '\r\x1b[K6/6 files [' in shown and 'files/s ETA' in shown and '100%' in shown
    assert '6 file(s): 6 OK' in shown
    for path, text in files.items():
        with open(os.path.splitext(path)[0] + '.srt', encoding='utf-8') as f:
            srt = f.read()
        assert srt.startswith('1\n00:00:00,') and ('\n%s\n' % text) in srt


def test_errors_say_what_to_change_and_the_exit_status_counts_them(make_daemon, tmp_path):
    d = make_daemon(workers=1)
    with open(d.ini) as f:
        text = f.read()
    with open(d.ini, 'w') as f:
        f.write(text.replace('scan_enabled = false', 'scan_enabled = true').replace('scan_interval_secs = 1\n',
                                                                                   'scan_interval_secs = 40\n'))
    d.start()
    folder, good = d.fixture('en_hello.wav')
    outside = os.path.join(FIXTURES, 'en_cancel.wav')
    r = d.cli('transcribe', '--format', 'text', os.path.join(folder, good), outside, os.path.join(folder, 'nope.wav'))
    assert r.returncode == 1
    assert '%s\t%s' % (os.path.join(folder, good), TEXTS['en_hello.wav']) in r.stdout
    line = [x for x in r.stdout.splitlines() if x.startswith(outside)][0]
    assert 'ERROR 7' in line and '[directory] allowed_roots in %s' % d.ini in line
    assert os.path.realpath(d.batch) in line and os.path.realpath(d.data) in line     # the roots it may use
    assert 'ERROR 4' in r.stdout and 'no such file' in r.stdout
    assert r.stderr.strip().endswith('3 file(s): 1 OK, 1 file not found (4), 1 bad request (7)'), r.stderr
    # A file in the drop folder: the CLI says so, and a raw 1002 with keepSource is refused too;
    # the scanner then takes it, once.
    os.makedirs(d.batch, exist_ok=True)
    dropped = os.path.join(d.batch, 'm.wav')
    shutil.copy(os.path.join(FIXTURES, 'en_phone.wav'), dropped)
    r = d.cli('transcribe', '--keep', dropped)
    assert r.returncode == 1 and 'lies in the drop folder [directory] audio_source_path' in r.stdout
    with Closing(d.client()) as c:
        c.send(1002, transcribe_req(d.batch, 'm.wav', sid='clientm', keepSource=True))
        _, body = c.recv(30)
    assert body['result'] == '7' and 'drop folder' in body['message'] and 'audio_source_path' in body['message']
    recs = wait_for(lambda: [x for x in d.records() if x['request'].get('fileName') == 'm.wav'], 60, 'm.wav record')
    assert len(recs) == 1 and recs[0]['source'] == 'scanner'
    assert recs[0]['data']['transcript'] == TEXTS['en_phone.wav']
    assert len(d.records()) == 2 and not os.path.exists(dropped)       # en_hello and m.wav, each once
    # Nothing matched, and a stopped daemon: exit 2 and 3, with a hint.
    os.makedirs(str(tmp_path / 'empty'))
    r = d.cli('transcribe', str(tmp_path / 'empty'))
    assert r.returncode == 2 and 'no files to transcribe' in r.stderr
    d.stop()
    r = d.cli('transcribe', os.path.join(folder, good))
    assert r.returncode == 3
    assert 'cannot reach the daemon at 127.0.0.1:%d' % d.port in r.stderr and '`svcmgr start`' in r.stderr
    r = d.cli('monitor')
    assert r.returncode == 3 and '[server] ip and port of %s' % d.ini in r.stderr


def test_the_readme_first_hour_works_as_written_with_the_shipped_app_ini(tmp_path):
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    for command in ('.venv/bin/python svcmgr.py transcribe tests/fixtures/en_hello.wav',
                    'cp tests/fixtures/en_cancel.wav batch/'):
        assert command in readme
    base = tmp_path / 'svcmgr'
    (base / 'tests' / 'fixtures').mkdir(parents=True)
    for name in ('en_hello.wav', 'en_cancel.wav'):
        shutil.copy(os.path.join(FIXTURES, name), str(base / 'tests' / 'fixtures'))
    with open(os.path.join(ROOT, 'app.ini'), encoding='utf-8') as f:
        text = f.read()
    assert 'port = 9099\n' in text
    (base / 'app.ini').write_text(text.replace('port = 9099\n', 'port = %d\n' % free_port(), 1), encoding='utf-8')

    def svcmgr(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '-c', str(base / 'app.ini')]
                              + list(args), cwd=str(base), capture_output=True, text=True, timeout=300)
    assert svcmgr('start').returncode == 0
    try:
        r = svcmgr('transcribe', 'tests/fixtures/en_hello.wav')
        assert r.returncode == 0 and r.stdout == '%s\t%s\n' % (base / 'tests' / 'fixtures' / 'en_hello.wav',
                                                              TEXTS['en_hello.wav'])
        shutil.copy(str(base / 'tests' / 'fixtures' / 'en_cancel.wav'), str(base / 'batch'))

        def scanned():
            for path in glob.glob(str(base / 'records' / '*.json')):
                with open(path, encoding='utf-8') as f:
                    for line in f:
                        rec = json.loads(line)
                        if rec['source'] == 'scanner':
                            return rec
            return None
        # The shipped scan interval is 40 s; inotify takes it well before the first scan could.
        rec = wait_for(scanned, 30, 'the dropped file recorded')
        assert rec['data']['transcript'] == TEXTS['en_cancel.wav']
        wait_for(lambda: not os.path.exists(str(base / 'batch' / 'en_cancel.wav')), 10, 'the source deleted')
        assert os.path.exists(str(base / 'tests' / 'fixtures' / 'en_hello.wav'))
    finally:
        assert svcmgr('stop').returncode == 0
