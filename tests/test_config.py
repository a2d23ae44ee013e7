"""Tests of _config: loading and validating app.ini, and the log files of each process."""
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import re
import sys
from pathlib import Path

import configobj
import pytest

ROOT = Path(__file__).resolve().parents[1]
# So the suite also runs as plain `pytest`, not only `python -m pytest` from the repo root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _config  # noqa: E402
from _config import ConfigError  # noqa: E402

SHIPPED = ROOT / 'app.ini'

# The app.ini of the 1.0 README, as deployed: absolute paths, no key added since.
APP_INI_1_0 = """\
[setting]
mode = TEST
log_level = debug
version = 1.0
worker_processes = 1
max_tasks = 100
session_timeout_secs = 30

[task]
mp3_backup = true
error_backup_path = /home/rootdev/error

[directory]
audio_source_path = /home/rootdev/batch
audio_target_path = /home/rootdev/batch/rec_mp3
scan_interval_secs = 40

[server]
ip = 0.0.0.0
port = 9099

[webhook]
url = http://www.data.io/speech

[db]
ip = 192.168.0.241
port = 3306
user = root
password = secure
name = SGSAS2
"""


def write_ini(folder: Path, text: str, name: str = 'app.ini') -> Path:
    path = folder / name
    path.write_text(text, encoding='utf-8')
    return path


def problems_of(path) -> list:
    with pytest.raises(ConfigError) as caught:
        _config.load(str(path))
    return caught.value.problems


# --- loading ---------------------------------------------------------------------------

def test_shipped_app_ini_loads_with_paths_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config.load(str(SHIPPED))
    assert _config.base_dir(cfg) == str(ROOT)
    assert cfg['setting']['mode'] == 'TEST'
    assert cfg['setting']['log_path'] == str(ROOT / 'logs')
    assert cfg['setting']['pidfile'] == str(ROOT / 'svcmgr.pid')
    assert cfg['setting']['psout'] == str(ROOT / 'psout.log')
    assert cfg['task']['error_backup_path'] == str(ROOT / 'error')
    assert cfg['directory']['audio_source_path'] == str(ROOT / 'batch')
    assert cfg['directory']['audio_target_path'] == str(ROOT / 'batch' / 'rec_mp3')
    assert cfg['directory']['allowed_roots'] == [
        os.path.realpath(ROOT / 'batch'), os.path.realpath(ROOT / 'batch' / 'rec_mp3'),
        os.path.realpath(ROOT / 'error')]
    assert cfg['setting']['session_timeout_secs'] == 300.0
    assert cfg['setting']['worker_processes'] == (os.cpu_count() or 1)
    assert cfg['server']['ip'] == '127.0.0.1'
    assert cfg['server']['port'] == 9099
    assert cfg['server']['allow'] == []
    assert cfg['engine']['type'] == 'pocketsphinx'
    assert cfg['engine']['model'] == ''
    assert cfg['webhook']['url'] == ''
    assert cfg['db']['enabled'] is False
    assert cfg['directory']['scan_ignore'] == ['*.part', '*.tmp', '~*']


def test_shipped_app_ini_has_every_key_with_a_comment():
    spec = configobj.ConfigObj(_config.CONFIGSPEC.splitlines(), list_values=False, _inspec=True)
    shipped = configobj.ConfigObj(str(SHIPPED), interpolation=False)
    assert shipped.sections == spec.sections
    for section in spec.sections:
        assert shipped[section].scalars == spec[section].scalars, section
        for key in spec[section].scalars:
            assert any(line.strip('# ') for line in shipped[section].comments[key]), (section, key)


def test_spec_declares_every_key_with_a_default():
    spec = configobj.ConfigObj(_config.CONFIGSPEC.splitlines(), list_values=False, _inspec=True)
    for section in spec.sections:
        for key, check in spec[section].items():
            assert 'default=' in check, (section, key)


def test_engine_types_come_from_the_engine_registry(tmp_path):
    import _engine
    spec = configobj.ConfigObj(_config.CONFIGSPEC.splitlines(), list_values=False, _inspec=True)
    names = ', '.join(repr(name) for name in _engine.ENGINES)
    assert spec['engine']['type'] == "option(%s, default='pocketsphinx')" % names
    for name, cls in _engine.ENGINES.items():
        cfg = _config.load(write_ini(tmp_path, '[engine]\ntype = %s\n' % name))
        engine = _engine.make_engine(cfg)
        assert type(engine) is cls
        assert engine.embedded == (name != 'remote')


def test_1_0_app_ini_loads(tmp_path):
    cfg = _config.load(str(write_ini(tmp_path, APP_INI_1_0)))
    assert cfg['setting']['version'] == '1.0'
    assert cfg['setting']['log_level'] == 'debug'
    assert cfg['setting']['worker_processes'] == 1
    assert cfg['setting']['session_timeout_secs'] == 30.0
    assert cfg['task']['error_backup_path'] == '/home/rootdev/error'
    assert cfg['directory']['audio_source_path'] == '/home/rootdev/batch'
    assert cfg['directory']['allowed_roots'] == [
        os.path.realpath(p) for p in ('/home/rootdev/batch', '/home/rootdev/batch/rec_mp3',
                                      '/home/rootdev/error')]
    assert cfg['server']['ip'] == '0.0.0.0'
    assert cfg['webhook']['url'] == 'http://www.data.io/speech'
    assert cfg['db']['password'] == 'secure'
    assert cfg['db']['name'] == 'SGSAS2'
    # Keys 1.0 did not have take their defaults, and the 1.0 behaviour where there was one.
    assert cfg['db']['enabled'] is False
    assert cfg['task']['source_after'] == 'delete'
    assert cfg['setting']['log_path'] == str(tmp_path / 'logs')


def test_empty_file_gives_every_default(tmp_path):
    cfg = _config.load(str(write_ini(tmp_path, '')))
    assert cfg['setting']['max_tasks'] == 100
    assert cfg['server']['max_packet_bytes'] == 1048576
    assert cfg['engine']['engine_slots'] == 1
    assert cfg['task']['retry_on_worker_death'] == 1
    assert cfg['directory']['scan_extensions'][0] == 'wav'
    assert cfg.filename == str(tmp_path / 'app.ini')


def test_relative_paths_follow_the_ini_not_the_cwd(tmp_path, monkeypatch):
    conf = tmp_path / 'conf'
    conf.mkdir()
    (tmp_path / 'data').mkdir()
    (tmp_path / 'link').symlink_to(tmp_path / 'data')
    ini = write_ini(conf, '[setting]\nlog_path = ../var/log\n'
                          '[directory]\naudio_source_path = in\n'
                          'allowed_roots = ../link, /srv/x\n')
    monkeypatch.chdir(tmp_path / 'data')
    cfg = _config.load(os.path.relpath(ini))
    assert _config.base_dir(cfg) == str(conf)
    assert cfg['setting']['log_path'] == str(tmp_path / 'var' / 'log')
    assert cfg['directory']['audio_source_path'] == str(conf / 'in')
    # Roots are compared with realpath'd request paths, so links are resolved here too.
    assert cfg['directory']['allowed_roots'] == [os.path.realpath(tmp_path / 'data'),
                                                 os.path.realpath('/srv/x')]


def test_one_item_list_and_empty_list(tmp_path):
    cfg = _config.load(str(write_ini(tmp_path, '[directory]\nscan_extensions = wav\n'
                                                '[server]\nallow = 10.1.2.3/8\n')))
    assert cfg['directory']['scan_extensions'] == ['wav']
    assert cfg['server']['allow'] == ['10.0.0.0/8']
    cfg = _config.load(str(write_ini(tmp_path, '[server]\nallow =\n')))
    assert cfg['server']['allow'] == []


def test_ipv6_listen_address(tmp_path):
    cfg = _config.load(str(write_ini(tmp_path, '[server]\nip = ::1\nallow = ::1/128, 127.0.0.0/8\n')))
    assert cfg['server']['ip'] == '::1'
    assert cfg['server']['allow'] == ['::1/128', '127.0.0.0/8']


@pytest.mark.parametrize('value, expected', [
    ('auto', os.cpu_count() or 1),
    ('AUTO', os.cpu_count() or 1),
    ('4', 4),
    ('64', 64),
])
def test_worker_processes(tmp_path, value, expected):
    cfg = _config.load(str(write_ini(tmp_path, f'[setting]\nworker_processes = {value}\n')))
    assert cfg['setting']['worker_processes'] == expected


def test_auto_worker_count_is_the_cpu_count(tmp_path, monkeypatch):
    monkeypatch.setattr(os, 'cpu_count', lambda: 7)
    cfg = _config.load(str(write_ini(tmp_path, '')))
    assert cfg['setting']['worker_processes'] == 7


def test_password_env_replaces_the_password(tmp_path, monkeypatch):
    ini = write_ini(tmp_path, '[db]\npassword = inline\npassword_env = SVCMGR_TEST_DB_PASSWORD\n')
    monkeypatch.setenv('SVCMGR_TEST_DB_PASSWORD', 's3cret,#%$')
    assert _config.load(str(ini))['db']['password'] == 's3cret,#%$'
    monkeypatch.delenv('SVCMGR_TEST_DB_PASSWORD')
    assert _config.load(str(ini))['db']['password'] == 'inline'


def test_password_is_taken_as_written(tmp_path, monkeypatch):
    # No interpolation: % and $ must reach the database untouched.
    ini = write_ini(tmp_path, '[db]\npassword = "p%(x)s$y,#z"\n')
    monkeypatch.setenv('SVCMGR_UNUSED', 'x')
    assert _config.load(str(ini))['db']['password'] == 'p%(x)s$y,#z'


# --- problems ---------------------------------------------------------------------------

@pytest.mark.parametrize('text, expected', [
    ('[server]\nbogus = 1\n', 'app.ini [server] bogus: unknown key'),
    ('[nosuch]\na = 1\n', 'app.ini [nosuch]: unknown section'),
    ('[server]\n[[sub]]\na = 1\n', 'app.ini [server.sub]: unknown section'),
    ('[DEFAULT]\n', 'app.ini [DEFAULT]: unknown section'),
    ('stray = 1\n', 'app.ini stray: unknown key (keys belong under a [section])'),
    ('setting = 1\n', 'app.ini setting: is a key, expected a [section]'),
    ('[server]\n[[ip]]\n', 'app.ini [server] ip: is a [[section]], expected a key'),
    ('[server]\nport = abc\n',
     'app.ini [server] port: the value "abc" is of the wrong type (expected an integer)'),
    ('[setting]\nmax_tasks = 0\n',
     'app.ini [setting] max_tasks: the value "0" is too small (minimum 1)'),
    ('[server]\nport = 70000\n',
     'app.ini [server] port: the value "70000" is too big (maximum 65535)'),
    ('[setting]\nsession_timeout_secs = 0\n',
     'app.ini [setting] session_timeout_secs: the value "0" is too small (minimum 0.1)'),
    ('[setting]\nheartbeat_secs = soon\n',
     'app.ini [setting] heartbeat_secs: the value "soon" is of the wrong type (expected a number)'),
    ('[task]\nmp3_backup = maybe\n',
     'app.ini [task] mp3_backup: the value "maybe" is of the wrong type (expected true or false)'),
    ('[setting]\nmode = DEV\n',
     'app.ini [setting] mode: the value "DEV" is not allowed (expected one of: TEST, PROD)'),
    ('[engine]\ntype = whisper\n',
     'app.ini [engine] type: the value "whisper" is not allowed'
     ' (expected one of: pocketsphinx, vosk, remote)'),
    ('[setting]\nworker_processes = 0\n',
     'app.ini [setting] worker_processes: the value "0" is too small (minimum 1)'),
    ('[setting]\nworker_processes = 65\n',
     'app.ini [setting] worker_processes: the value "65" is too big (maximum 64)'),
    ('[setting]\nworker_processes = many\n',
     'app.ini [setting] worker_processes: the value "many" is of the wrong type'
     ' (expected "auto" or an integer)'),
    ('[server]\nallow = 127.0.0.0/8, 10.0.0.300/8, nope\n',
     'app.ini [server] allow: the value "10.0.0.300/8, nope" is not a network in CIDR form'
     ' (e.g. 127.0.0.0/8)'),
    ('[server]\nip = localhost\n',
     'app.ini [server] ip: the value "localhost" is not an IPv4 or IPv6 address'),
    ('[server]\nip = 999.1.1.1\n',
     'app.ini [server] ip: the value "999.1.1.1" is not an IPv4 or IPv6 address'),
    ('[webhook]\nurl = ftp://example.com/hook\n',
     'app.ini [webhook] url: the value "ftp://example.com/hook" is not an http:// or https:// URL'),
    ('[webhook]\nurl = www.data.io/speech\n',
     'app.ini [webhook] url: the value "www.data.io/speech" is not an http:// or https:// URL'),
    ('[webhook]\nurl = http://\n',
     'app.ini [webhook] url: the value "http://" is not an http:// or https:// URL'),
    ('[db]\npassword = a,b\n',
     'app.ini [db] password: the value "a, b" is a list (expected one value;'
     ' put it in quotes if it contains a comma)'),
    ('[setting]\nlog_path = ""\n', 'app.ini [setting] log_path: the value is empty (expected a path)'),
])
def test_each_problem_gives_its_line(tmp_path, text, expected):
    assert problems_of(write_ini(tmp_path, text)) == [expected]


def test_several_problems_give_several_lines_named_after_the_file(tmp_path):
    ini = write_ini(tmp_path, '[setting]\nmax_tasks = 0\nmode = DEV\n'
                              '[server]\nport = abc\nbogus = 1\n'
                              '[nosuch]\n', name='site.ini')
    problems = problems_of(ini)
    assert sorted(problems) == sorted([
        'site.ini [setting] max_tasks: the value "0" is too small (minimum 1)',
        'site.ini [setting] mode: the value "DEV" is not allowed (expected one of: TEST, PROD)',
        'site.ini [server] port: the value "abc" is of the wrong type (expected an integer)',
        'site.ini [server] bogus: unknown key',
        'site.ini [nosuch]: unknown section',
    ])


def test_missing_file(tmp_path):
    missing = tmp_path / 'app.ini'
    assert problems_of(missing) == [f'app.ini: no such file: {missing}']
    assert problems_of(tmp_path) == [f'{tmp_path.name}: no such file: {tmp_path}']


def test_unreadable_file(tmp_path, monkeypatch):
    ini = write_ini(tmp_path, '')

    def refuse(*args, **kwargs):
        raise PermissionError(13, 'Permission denied', str(ini))

    # chmod 0 would not stop root, who runs this suite in CI, so configobj's open() refuses.
    monkeypatch.setattr(configobj, 'open', refuse, raising=False)
    assert problems_of(ini) == [f'app.ini: cannot read {ini}: Permission denied']


def test_not_utf8(tmp_path):
    ini = tmp_path / 'app.ini'
    ini.write_bytes('[directory]\ndomain_name = 상담\n'.encode('cp949'))
    [problem] = problems_of(ini)
    assert problem.startswith('app.ini: not UTF-8 text')


def test_korean_values_load(tmp_path):
    cfg = _config.load(str(write_ini(tmp_path, '[directory]\ndomain_name = 상담센터\n')))
    assert cfg['directory']['domain_name'] == '상담센터'


@pytest.mark.parametrize('text, expected', [
    ('[server]\nport = 1\nport = 2\n', 'app.ini line 3: duplicate key: port = 2'),
    ('[server]\n[db]\n[server]\n', 'app.ini line 3: duplicate section: [server]'),
    ('[server]\nport 9099\n',
     'app.ini line 2: neither "key = value" nor "[section]": port 9099'),
    ('[[orphan]]\n', 'app.ini line 1: section nested deeper than its parent: [[orphan]]'),
])
def test_syntax_error_gives_its_line(tmp_path, text, expected):
    assert problems_of(write_ini(tmp_path, text)) == [expected]


def test_several_syntax_errors_give_several_lines(tmp_path):
    ini = write_ini(tmp_path, '[setting]\nmode = TEST\nmode = PROD\njust words\n')
    assert problems_of(ini) == ['app.ini line 3: duplicate key: mode = PROD',
                                'app.ini line 4: neither "key = value" nor "[section]": just words']


def test_config_error_prints_and_pickles():
    error = ConfigError(['a.ini [x]: unknown section', 'a.ini [y]: unknown section'])
    assert str(error) == 'a.ini [x]: unknown section\na.ini [y]: unknown section'
    assert pickle.loads(pickle.dumps(error)).problems == error.problems


# --- logging ----------------------------------------------------------------------------

LINE = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) (\S+)\[(\d+)\] (\S+): (.*)$')


@pytest.fixture
def root_logger():
    """Give the test the root logger and put pytest's handlers back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in saved_handlers:
            handler.close()
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def cfg_in(folder: Path, mode: str, level: str = 'info'):
    return _config.load(str(write_ini(folder, f'[setting]\nmode = {mode}\nlog_level = {level}\n'
                                              'log_path = var/logs\n')))


def test_setup_logging_test_mode_writes_one_app_log(tmp_path, root_logger):
    cfg = cfg_in(tmp_path, 'TEST')
    _config.setup_logging(cfg, 'master')
    logging.getLogger('svcmgr.test').info('hello %s', 'master')
    _config.setup_logging(cfg, 'scanner')
    logging.getLogger('svcmgr.test').debug('not at info level')
    logging.getLogger('svcmgr.test').warning('hello scanner')

    assert len(root_logger.handlers) == 1
    handler = root_logger.handlers[0]
    assert type(handler) is logging.FileHandler
    assert root_logger.level == logging.INFO
    assert sorted(os.listdir(tmp_path / 'var' / 'logs')) == ['app.log']
    lines = (tmp_path / 'var' / 'logs' / 'app.log').read_text(encoding='utf-8').splitlines()
    assert len(lines) == 2
    first = LINE.match(lines[0])
    assert first.groups() == ('INFO', 'MainProcess', str(os.getpid()), 'svcmgr.test', 'hello master')
    assert LINE.match(lines[1]).group(1, 5) == ('WARNING', 'hello scanner')


def _child_logs(cfg):
    _config.setup_logging(cfg, 'worker-2')
    logging.getLogger('svcmgr.worker').info('from the child')


def test_setup_logging_prod_mode_one_file_per_process(tmp_path, root_logger):
    cfg = cfg_in(tmp_path, 'PROD', level='debug')
    _config.setup_logging(cfg, 'master')
    handler = root_logger.handlers[0]
    assert isinstance(handler, logging.handlers.TimedRotatingFileHandler)
    assert handler.when == 'MIDNIGHT' and handler.backupCount == 31
    assert root_logger.level == logging.DEBUG
    logging.getLogger('svcmgr.master').debug('from the master')

    child = multiprocessing.get_context('fork').Process(target=_child_logs, args=(cfg,),
                                                        name='PacketAgent-2')
    child.start()
    child.join(30)
    assert child.exitcode == 0
    logging.getLogger('svcmgr.master').info('after the child')

    logs = tmp_path / 'var' / 'logs'
    assert sorted(os.listdir(logs)) == ['master.log', 'worker-2.log']
    master = (logs / 'master.log').read_text(encoding='utf-8')
    assert 'from the master' in master and 'after the child' in master
    assert 'from the child' not in master
    [line] = (logs / 'worker-2.log').read_text(encoding='utf-8').splitlines()
    assert LINE.match(line).groups() == ('INFO', 'PacketAgent-2', str(child.pid), 'svcmgr.worker',
                                         'from the child')


@pytest.mark.parametrize('mode, filename', [('TEST', 'app.log'), ('PROD', 'master.log')])
def test_reopen_logs_after_the_file_was_moved(tmp_path, root_logger, mode, filename):
    cfg = cfg_in(tmp_path, mode)
    _config.setup_logging(cfg, 'master')
    logger = logging.getLogger('svcmgr.test')
    current = tmp_path / 'var' / 'logs' / filename
    moved = tmp_path / 'var' / 'logs' / (filename + '.1')

    logger.info('before the move')
    current.rename(moved)
    logger.info('after the move, before reopening')
    assert not current.exists()
    _config.reopen_logs()
    logger.info('after reopening')

    old_text = moved.read_text(encoding='utf-8')
    assert 'before the move' in old_text and 'after the move, before reopening' in old_text
    new_text = current.read_text(encoding='utf-8')
    assert 'after reopening' in new_text and 'before' not in new_text


def test_reopen_logs_recreates_a_removed_folder(tmp_path, root_logger):
    cfg = cfg_in(tmp_path, 'TEST')
    _config.setup_logging(cfg, 'master')
    logs = tmp_path / 'var' / 'logs'
    (logs / 'app.log').unlink()
    logs.rmdir()
    _config.reopen_logs()
    logging.getLogger('svcmgr.test').error('still logging')
    assert 'still logging' in (logs / 'app.log').read_text(encoding='utf-8')
