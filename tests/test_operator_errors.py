"""The errors of an operator's first hour, through the real CLI: folders checked at start
(exit 2, one line naming the key), a bad pocketsphinx model said in one svcmgr line, stop
on a stopped daemon (LSB: 0), and a graceful stop that does not call workers dead."""
import os
import re

from conftest import wait_for


def test_unusable_folders_are_named_at_start_with_their_key(make_daemon, tmp_path):
    d = make_daemon(roots='batch, data, missing-root')
    with open(d.ini) as f:
        text = f.read()
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    with open(d.ini, 'w') as f:
        f.write(text.replace('log_path = logs', 'log_path = %s/logs' % blocker)
                .replace('error_backup_path = error', 'error_backup_path = %s/error' % blocker))
    r = d.cli('start')
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines == [
        'app.ini [setting] log_path: cannot create %s/logs: Not a directory (%s is a file, not a folder)'
        % (blocker, blocker),
        'app.ini [task] error_backup_path: cannot create %s/error: Not a directory (%s is a file, not a folder)'
        % (blocker, blocker),
        'app.ini [directory] allowed_roots: %s does not exist (or is not a folder): create it or take it out of '
        'the list' % os.path.join(d.base, 'missing-root')], lines
    assert d.pid is None and 'cannot listen' not in r.stderr


def test_a_bad_model_is_one_line_that_says_why(make_daemon, tmp_path):
    model = tmp_path / 'model'
    model.mkdir()
    d = make_daemon(model=str(model))
    r = d.cli('start')
    assert r.returncode == 1 and d.pid is None
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines                           # no raw C log line before it
    assert lines[0].startswith("svcmgr: pocketsphinx could not load [engine] model '%s'" % model)
    assert "does not contain acoustic model definition 'mdef'" in lines[0]


def test_stop_when_stopped_is_0_and_a_graceful_stop_kills_no_one(make_daemon):
    d = make_daemon(workers=2)
    r = d.cli('stop')
    assert r.returncode == 0 and 'not running' in r.stdout
    d.start()
    wait_for(lambda: len(d.workers()) == 2, 30, 'two workers')
    d.stop()
    log = d.log_text()
    assert 'died with' not in log
    assert len(re.findall(r'master: worker \d \(pid \d+\) ended with exit status 0', log)) == 2, log[-3000:]
    assert d.cli('stop').returncode == 0
