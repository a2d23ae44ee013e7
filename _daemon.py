"""Running svcmgr as a daemon: what is checked and prepared before the fork, daemonizing with
python-daemon (pidfile, psout.log), finding the running master by its pidfile and title,
and the start, stop, status and reload commands. Heavy modules load only where needed, so
`svcmgr.py status` and `stop` start fast.
"""
import logging
import os
import signal
import sys
import time

import _children
import _config

log = logging.getLogger('master')


def banner_start(fh, pid):
    fh.write('================[ Program Start ]============================= %s\n'
             % time.strftime('%Y.%m.%d %H:%M:%S'))
    fh.write('Service Manager Daemon started with pid %d\n' % pid)
    fh.flush()


def banner_end(fh):
    fh.write('================[ Program End ]=============================== %s\n'
             % time.strftime('%Y.%m.%d %H:%M:%S'))
    fh.flush()


def read_pid(cfg):
    """The pid of the running daemon, or None; a stale pidfile is removed."""
    path = cfg['setting']['pidfile']
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and is_master(pid):
        return pid
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return None


def is_master(pid):
    import psutil
    try:
        title = _children.title_of(psutil.Process(pid))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return title.startswith('svcmgr: master')


def prepare_master(cfg, cfg_path):
    """Everything that can fail before forking: folders, the port, the engine."""
    import _engine
    from _conns import make_listener
    for key in ('audio_source_path', 'audio_target_path'):
        os.makedirs(cfg['directory'][key], exist_ok=True)
    os.makedirs(cfg['task']['error_backup_path'], exist_ok=True)
    os.makedirs(os.path.join(_config.base_dir(cfg), 'records'), exist_ok=True)
    os.makedirs(cfg['setting']['log_path'], exist_ok=True)
    listener = make_listener(cfg['server']['ip'], int(cfg['server']['port']))
    engine = _engine.make_engine(cfg)
    engine.load()
    return listener, engine


def run_master(cfg, cfg_path, listener, engine, ready_fd=None, psout=None):
    from _master import Master
    _children.set_title('svcmgr: master %s' % cfg_path)
    _config.setup_logging(cfg, 'master')
    if psout is not None:
        banner_start(psout, os.getpid())
    log.info('================ Service Manager %s started with pid %d', cfg['setting']['version'], os.getpid())
    master = Master(cfg, listener, engine, ready_fd=ready_fd, cfg_path=cfg_path)
    try:
        master.serve()
    finally:
        if psout is not None:
            banner_end(psout)
        logging.shutdown()


def cmd_start(cfg, cfg_path, foreground=False):
    from _engine import EngineError
    pid = read_pid(cfg)
    if pid:
        print('svcmgr is already running with pid %d' % pid)
        return 1
    problems = _config.check_folders(cfg)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        return 2
    try:
        listener, engine = prepare_master(cfg, cfg_path)
    except OSError as exc:
        print('svcmgr: cannot listen on %s:%s: %s' % (cfg['server']['ip'], cfg['server']['port'], exc.strerror),
              file=sys.stderr)
        return 1
    except EngineError as exc:
        print('svcmgr: %s' % exc, file=sys.stderr)
        return 1
    psout_path = cfg['setting']['psout']
    pidfile_path = cfg['setting']['pidfile']
    if foreground:
        psout = open(psout_path, 'a', encoding='utf-8')
        with open(pidfile_path, 'w') as f:
            f.write('%d\n' % os.getpid())
        try:
            run_master(cfg, cfg_path, listener, engine, psout=psout)
        finally:
            _remove_pidfile(pidfile_path, os.getpid())
        return 0
    return daemonize(cfg, cfg_path, listener, engine, psout_path, pidfile_path)


def daemonize(cfg, cfg_path, listener, engine, psout_path, pidfile_path):
    """Fork the daemon with python-daemon and wait until it says it is ready."""
    import daemon
    import daemon.pidfile
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first:
        os.close(ready_w)
        listener.close()
        os.waitpid(first, 0)
        got = b''
        deadline = time.time() + 120
        while time.time() < deadline:
            import select
            r, _, _ = select.select([ready_r], [], [], 1)
            if r:
                chunk = os.read(ready_r, 64)
                got += chunk
                if not chunk or b'\n' in got:
                    break
        os.close(ready_r)
        if got.startswith(b'ok'):
            print('svcmgr started with pid %s' % (read_pid(cfg) or '?'))
            return 0
        print('svcmgr failed to start; see %s' % psout_path, file=sys.stderr)
        return 1
    os.close(ready_r)
    psout = open(psout_path, 'a', encoding='utf-8', buffering=1)
    context = daemon.DaemonContext(
        working_directory=_config.base_dir(cfg),
        umask=0o022,
        pidfile=daemon.pidfile.TimeoutPIDLockFile(pidfile_path, acquire_timeout=0),
        stdout=psout, stderr=psout,
        files_preserve=[listener, ready_w],
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    code = 0
    try:
        with context:
            run_master(cfg, cfg_path, listener, engine, ready_fd=ready_w, psout=psout)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc(file=psout)
        code = 1
    os._exit(code)


def _remove_pidfile(path, pid):
    try:
        with open(path) as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass


def cmd_stop(cfg, quiet=False):
    import psutil
    pid = read_pid(cfg)
    if not pid:
        if not quiet:
            print('svcmgr is not running')
        return 0        # LSB: stopping a stopped service succeeds
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    os.kill(pid, signal.SIGTERM)
    wait = float(cfg['setting']['graceful_timeout_secs']) + 30
    gone, alive = psutil.wait_procs(procs, timeout=wait)
    if alive:
        print('svcmgr: %d process(es) still running after %.0f s; killing them' % (len(alive), wait),
              file=sys.stderr)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
    print('svcmgr stopped (pid %d)' % pid)
    return 0


def cmd_status(cfg):
    import psutil
    pid = read_pid(cfg)
    if not pid:
        print('svcmgr is not running')
        return 3
    master = psutil.Process(pid)
    print('%-8s %-8s %s' % ('PID', 'ROLE', 'TITLE'))
    print('%-8d %-8s %s' % (pid, 'master', _children.title_of(master)))
    for child in master.children(recursive=True):
        try:
            title = _children.title_of(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        role = title.split()[1] if title.startswith('svcmgr: ') else 'other'
        print('%-8d %-8s %s' % (child.pid, role, title))
    return 0


def cmd_reload(cfg, cfg_path):
    pid = read_pid(cfg)
    if not pid:
        print('svcmgr is not running')
        return 1
    os.kill(pid, signal.SIGHUP)
    print('svcmgr (pid %d) told to reload %s' % (pid, cfg_path))
    return 0


def fallback_cfg(cfg_path):
    """Just enough of an invalid app.ini for stop and status: the pidfile and the stop wait."""
    import configobj
    folder = os.path.dirname(cfg_path)
    pidfile = 'svcmgr.pid'
    try:
        raw = configobj.ConfigObj(cfg_path, interpolation=False, encoding='utf-8')
        pidfile = raw.get('setting', {}).get('pidfile') or pidfile
    except (configobj.ConfigObjError, OSError, UnicodeDecodeError):
        pass
    return {'setting': {'pidfile': os.path.join(folder, os.path.expanduser(str(pidfile))),
                        'graceful_timeout_secs': 30}}
