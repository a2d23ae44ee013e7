"""Packaging: pyproject.toml names every module, `svcmgr --version` says its version, and a
wheel built from the tree, installed into a new venv, gives a `svcmgr` command that starts
the daemon from ./app.ini (the shipped one), transcribes the shipped fixture and stops it."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tomllib

from conftest import ROOT, expected_texts, wait_for
from helpers import free_port

TEXTS = expected_texts()


def pyproject():
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)


def test_pyproject_lists_every_module_and_the_version_is_one():
    tool = pyproject()['tool']['setuptools']
    modules = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py')))
    assert sorted(tool['py-modules']) == modules
    assert pyproject()['project']['scripts'] == {'svcmgr': 'svcmgr:main'}
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'svcmgr.py'), '--version'], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == 'svcmgr %s\n' % pyproject()['project']['version']


def test_an_installed_svcmgr_runs_from_the_folder_of_its_app_ini(tmp_path):
    wheels = tmp_path / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(wheels), ROOT],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = glob.glob(str(wheels / 'svcmgr-*.whl'))
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
    # The dependencies come from the test venv (already pinned and installed), the rest from the wheel.
    site = glob.glob(str(venv / 'lib' / 'python3*' / 'site-packages'))[0]
    with open(os.path.join(site, 'svcmgr-deps.pth'), 'w') as f:
        f.write(next(p for p in sys.path if p.endswith('site-packages')) + '\n')
    subprocess.run([str(venv / 'bin' / 'pip'), 'install', '-q', '--no-deps', wheel], check=True, timeout=300,
                   capture_output=True)
    svcmgr = str(venv / 'bin' / 'svcmgr')
    assert subprocess.run([svcmgr, '--version'], capture_output=True, text=True).stdout.startswith('svcmgr 2.')
    assert os.path.isfile(os.path.join(str(venv), 'share', 'svcmgr', 'schema.sql'))
    # An operator's folder: the shipped app.ini (on a free port) and the fixture under tests/fixtures.
    home = tmp_path / 'srv'
    (home / 'tests' / 'fixtures').mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, 'tests', 'fixtures', 'en_hello.wav'), str(home / 'tests' / 'fixtures'))
    with open(os.path.join(ROOT, 'app.ini'), encoding='utf-8') as f:
        text = re.sub(r'(?m)^port = 9099$', 'port = %d' % free_port(), f.read(), count=1)
    (home / 'app.ini').write_text(text, encoding='utf-8')

    def run(*args):
        return subprocess.run([svcmgr] + list(args), cwd=str(home), capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, SVCMGR_CONFIG=''))
    r = run('start')
    try:
        assert r.returncode == 0, (r.stdout, r.stderr)
        r = run('transcribe', 'tests/fixtures/en_hello.wav')
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert r.stdout == '%s\t%s\n' % (home / 'tests' / 'fixtures' / 'en_hello.wav', TEXTS['en_hello.wav'])
        assert os.path.exists(str(home / 'tests' / 'fixtures' / 'en_hello.wav'))        # kept
    finally:
        assert run('stop').returncode == 0
    wait_for(lambda: not os.path.exists(str(home / 'svcmgr.pid')), 30, 'pidfile removed')
    assert run('status').returncode == 3


def test_lock_files_are_current_and_every_package_hashed():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'lock.py'), '--check'], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ('requirements.lock', 'requirements-vosk.lock', 'requirements-test.lock'):
        with open(os.path.join(ROOT, name), encoding='utf-8') as f:
            text = f.read()
        pins = re.findall(r'(?m)^([A-Za-z0-9._-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}', text)
        assert len(pins) == len(re.findall(r'(?m)^[A-Za-z0-9._-]+==', text)) > 10, name


def test_a_stale_lock_is_named_and_stops_bootstrap(tmp_path):
    for name in glob.glob(os.path.join(ROOT, 'requirements*')) + [os.path.join(ROOT, 'bootstrap.sh')]:
        shutil.copy(name, str(tmp_path))
    (tmp_path / 'tools').mkdir()
    shutil.copy(os.path.join(ROOT, 'tools', 'lock.py'), str(tmp_path / 'tools'))
    check = [sys.executable, str(tmp_path / 'tools' / 'lock.py'), '--check']
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0
    req = tmp_path / 'requirements.txt'
    req.write_text(req.read_text().replace('av==18.1.0', 'av==18.0.0'))
    out = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert 'requirements.lock is out of date with requirements.txt: run .venv/bin/python tools/lock.py' in out.stderr
    assert 'requirements.lock has av 18.1.0, requirements.txt pins 18.0.0' in out.stderr
    assert 'requirements-test.lock is out of date with requirements.txt' in out.stderr
    # bootstrap.sh (start.sh, test.sh) refuses to install from it.
    out = subprocess.run(['sh', str(tmp_path / 'bootstrap.sh'), 'requirements.txt'], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and 'requirements.lock is out of date' in out.stderr
    assert not glob.glob(str(tmp_path / '.venv' / 'lib' / 'python3*' / 'site-packages' / 'av'))
