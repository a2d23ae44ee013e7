"""svcmgr under systemd: the shipped unit passes `systemd-analyze verify`, and `run` speaks
Type=notify (READY=1 with its pid once serving, STOPPING=1 on TERM) to a $NOTIFY_SOCKET
like systemd's, reloads on HUP (ExecReload), and with [setting] log_to = stderr,
log_format = json writes one JSON object per line with the process role and speechID."""
import json
import os
import signal
import socket
import subprocess
import sys

from conftest import ROOT, expected_texts, transcribe_req, wait_for
from helpers import Closing

TEXTS = expected_texts()


def test_the_unit_file_verifies(tmp_path):
    with open(os.path.join(ROOT, 'svcmgr.service')) as f:
        unit = f.read()
    assert 'Type=notify' in unit and 'ExecReload=/bin/kill -HUP $MAINPID' in unit and ' run\n' in unit
    for option in ('NoNewPrivileges=yes', 'PrivateTmp=yes', 'ProtectSystem=strict', 'ReadWritePaths=/opt/svcmgr'):
        assert option in unit
    # Point it at this tree so that verify can check the command exists.
    unit = unit.replace('/opt/svcmgr/.venv/bin/python', sys.executable).replace('/opt/svcmgr/svcmgr.py',
                                                                                  os.path.join(ROOT, 'svcmgr.py'))
    path = tmp_path / 'svcmgr.service'
    path.write_text(unit)
    out = subprocess.run(['systemd-analyze', 'verify', str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == '', out.stderr


def test_run_notifies_reloads_and_logs_json_to_stderr(make_daemon, tmp_path):
    d = make_daemon(workers=1)
    with open(d.ini) as f:
        text = f.read()
    with open(d.ini, 'w') as f:
        f.write(text.replace('log_path = logs\n', 'log_path = logs\nlog_to = stderr\nlog_format = json\n'))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / 'notify'))
    notify.settimeout(120)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '-c', d.ini, 'run'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / 'notify')))
    try:
        assert notify.recv(4096).decode() == 'READY=1\nMAINPID=%d' % proc.pid
        folder, name = d.fixture('en_hello.wav')
        with Closing(d.client()) as c:
            c.send(1002, transcribe_req(folder, name, sid='jsonlog1'))
            _, body = c.recv(60)
        assert body['result'] == '0' and body['transcript'] == TEXTS['en_hello.wav']
        os.kill(proc.pid, signal.SIGHUP)                    # what ExecReload does
        wait_for(lambda: len(d.workers()) == 1 and proc.poll() is None, 30, 'a worker after reload')
        os.kill(proc.pid, signal.SIGTERM)
        assert notify.recv(4096).decode() == 'STOPPING=1'
        _, err = proc.communicate(timeout=120)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith('{')]
    assert len(lines) == len(err.splitlines()), err[:2000]             # every line is JSON
    assert {'master', 'worker-1'} <= {line['role'] for line in lines}, {line['role'] for line in lines}
    mine = [line for line in lines if line.get('speechID') == 'jsonlog1']
    assert mine and all(line['level'] in ('DEBUG', 'INFO') and line['pid'] for line in mine)
    assert any('reloading' in line['message'] for line in lines)
    assert not os.path.exists(os.path.join(d.base, 'logs', 'app.log'))
