"""The shape of the code (tools/check_layout.py): rooms of bounded size, no import cycle; and a
command line that loads only what each command needs."""
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import check_layout  # noqa: E402

HEAVY = ('av', 'pymysql', 'requests', 'pocketsphinx', 'vosk', 'pika', '_master', '_worker', '_audio', '_db', '_webhook',
         '_cluster_thread', '_cluster_db')


def test_no_function_over_80_lines_no_class_over_400_no_import_cycle():
    assert check_layout.check(ROOT) == []


def test_the_checker_finds_a_cycle_and_an_oversized_function(tmp_path):
    (tmp_path / 'a.py').write_text('import b\n')
    (tmp_path / 'b.py').write_text('from a import x\n\n\ndef long():\n' + '    pass\n' * 90)
    problems = check_layout.check(str(tmp_path))
    assert 'import cycle: a -> b -> a' in problems
    assert any('function long has 91 lines' in p for p in problems)


def test_status_and_stop_load_no_heavy_module(tmp_path):
    ini = tmp_path / 'app.ini'
    ini.write_text('[setting]\nlog_path = logs\n')
    code = ('import sys; sys.path.insert(0, %r); import svcmgr\n'
            'for cmd in ("status", "stop"):\n'
            '    svcmgr.main(["-c", %r, cmd])\n'
            'print(",".join(sorted(m for m in %r if m in sys.modules)))' % (ROOT, str(ini), HEAVY))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ['svcmgr is not running', 'svcmgr is not running']
    assert lines[-1] == '', 'status/stop imported %s' % lines[-1]
