"""Reload cannot kill the master: on the real daemon, with a task in flight, a log_path that
cannot be created and a half-copied model folder (one whose native loader calls exit())
are refused and logged; the master, its workers and the task in flight go on as before.
A good new model passes its probe and the new workers use it."""
import os
import shutil

import pocketsphinx
import psutil
import pytest

from conftest import expected_texts, long_wav, transcribe_req, wait_for

TEXTS = expected_texts()
MODEL = os.path.join(pocketsphinx.get_model_path(), 'en-us', 'en-us')


def set_ini(d, old, new):
    with open(d.ini) as f:
        text = f.read()
    assert old in text
    with open(d.ini, 'w') as f:
        f.write(text.replace(old, new))


def start_long_task(d, sid):
    """A client with a task of ~20 s of speech in flight (it is recognised for a few seconds)."""
    path = long_wav(os.path.join(d.data, sid + '.wav'), 20)
    c = d.client()
    c.send(1002, transcribe_req(d.data, os.path.basename(path), sid=sid))
    wait_for(lambda: any(w.get('speechID') == sid for w in monitor_workers(d)), 30, 'the task on a worker')
    return c


def monitor_workers(d):
    c = d.client()
    try:
        c.send(1003, {'type': 'all'})
        return c.recv(10)[1]['workers']
    finally:
        c.close()


def settled(d, master, text, timeout):
    """Wait until the log says `text` or the master is gone (the old daemon's way of failing)."""
    wait_for(lambda: text in d.log_text() or not psutil.pid_exists(master), timeout, repr(text))
    assert psutil.pid_exists(master) and d.pid == master, 'the master died in the reload'


def ask(d, fixture, sid):
    folder, name = d.fixture(fixture)
    c = d.client()
    try:
        c.send(1002, transcribe_req(folder, name, sid=sid))
        return c.recv(120)[1]
    finally:
        c.close()


def test_reload_with_a_log_path_that_cannot_be_created_is_refused(make_daemon):
    d = make_daemon(workers=1).start()
    master = d.pid
    workers = {w.pid for w in d.workers()}
    c = start_long_task(d, 'in-flight-log')
    blocker = os.path.join(d.base, 'not-a-folder')
    with open(blocker, 'w') as f:
        f.write('a file where the log folder would go')
    set_ini(d, 'log_path = logs', 'log_path = %s' % os.path.join(blocker, 'logs'))
    set_ini(d, 'max_tasks = 100', 'max_tasks = 7')
    assert d.cli('reload').returncode == 0
    settled(d, master, 'reload refused', 30)
    assert 'log_path' in d.log_text().split('reload refused', 1)[1].splitlines()[0]
    answer = c.recv(120)[1]
    c.close()
    assert answer['result'] == '0' and answer['transcript'], answer
    assert d.pid == master and {w.pid for w in d.workers()} == workers
    after = ask(d, 'en_morning.wav', 'after-log')
    assert after['result'] == '0' and after['transcript'] == TEXTS['en_morning.wav']
    c = d.client()
    c.send(1003, {'type': 'all'})
    assert c.recv(10)[1]['queue']['maxTasks'] == 100       # the old configuration stays, all of it
    c.close()


@pytest.mark.parametrize('cut', ['sendump', 'means'])
def test_reload_with_a_half_copied_model_keeps_the_old_engine(make_daemon, cut):
    # sendump cut short: pocketsphinx's loader calls exit(1); means cut short: it raises.
    d = make_daemon(workers=1).start()
    master = d.pid
    workers = {w.pid for w in d.workers()}
    half = os.path.join(d.base, 'model-half')
    shutil.copytree(MODEL, half)
    os.truncate(os.path.join(half, cut), 0 if cut == 'sendump' else 1000)
    c = start_long_task(d, 'in-flight-model')
    set_ini(d, 'model = \n', 'model = model-half\n')
    assert d.cli('reload').returncode == 0
    settled(d, master, 'failed its probe', 60)
    answer = c.recv(120)[1]
    c.close()
    assert answer['result'] == '0' and answer['transcript'], answer
    assert d.pid == master and {w.pid for w in d.workers()} == workers
    after = ask(d, 'en_morning.wav', 'after-model')
    assert after['result'] == '0' and after['transcript'] == TEXTS['en_morning.wav']


def test_reload_with_a_good_new_model_passes_the_probe_and_new_workers_use_it(make_daemon):
    d = make_daemon(workers=1).start()
    workers = {w.pid for w in d.workers()}
    shutil.copytree(MODEL, os.path.join(d.base, 'model-copy'))
    set_ini(d, 'model = \n', 'model = model-copy\n')
    assert d.cli('reload').returncode == 0
    wait_for(lambda: 'reload done' in d.log_text(), 60, 'the reload applied')
    assert 'passed its probe' in d.log_text()
    wait_for(lambda: d.workers() and not ({w.pid for w in d.workers()} & workers), 30, 'new workers')
    after = ask(d, 'en_morning.wav', 'after-good-model')
    assert after['result'] == '0' and after['transcript'] == TEXTS['en_morning.wav']
