"""What a reload must pass before the master takes any of it: the folders and the log file
the new app.ini names (made or checked in the master, where that cannot hurt), and a new
embedded engine model, loaded and tried on audio in a child process (a probe) first: a
native loader that crashes or calls exit() there takes only the probe with it.

Run as a script (`python _reload.py <app.ini>`), this file is the probe itself.
"""
import array
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

log = logging.getLogger('master')

PROBE_TIMEOUT_SECS = 600.0      # a large model on a slow disk; the master goes on meanwhile
PROBE_MARK = 'svcmgr-probe: '
OUTPUT_TAIL = 2000


def preflight(cfg):
    """Problems with what the new app.ini needs on disk (folders made where missing)."""
    import _config
    problems = []
    setting = cfg['setting']
    log_file = None
    if setting.get('log_to', 'file') == 'file':     # log_to = stderr writes no log file
        log_file = os.path.join(setting['log_path'], 'app.log' if setting['mode'] == 'TEST' else 'master.log')
    needs = [('[setting] log_path', setting['log_path'], log_file),
             ('[directory] audio_source_path', cfg['directory']['audio_source_path'], None),
             ('[directory] audio_target_path', cfg['directory']['audio_target_path'], None),
             ('[task] error_backup_path', cfg['task']['error_backup_path'], None),
             ('records', os.path.join(_config.base_dir(cfg), 'records'), None)]
    for what, folder, file_name in needs:
        try:
            os.makedirs(folder, exist_ok=True)
            if file_name:
                with open(file_name, 'a', encoding='utf-8'):
                    pass
        except OSError as exc:
            problems.append('%s %s cannot be used: %s' % (what, folder, exc.strerror or exc))
    return problems


# Sections a reload does not apply: what reads them (the db writer, the webhook senders, the
# cluster thread) is made once, at start.
RESTART_SECTIONS = ('db', 'webhook', 'cluster')


def keep_restart_sections(cfg, running):
    """Put the running RESTART_SECTIONS into the new configuration `cfg`, so that nothing reads
    values that do not run (such as another node name), and log the keys that wait for a restart."""
    for name in RESTART_SECTIONS:
        new, old = cfg.get(name), running.get(name)
        if new is None or old is None or dict(new) == dict(old):
            continue
        keys = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        log.warning('master: reload: [%s] %s changed; that takes a restart (svcmgr.py restart), the running '
                    'values stay until then', name, ', '.join(keys))
        cfg[name] = old.dict()


def model_fingerprint(cfg):
    """[(file, size, mtime_ns)] of the model folder app.ini names, or None (a packaged model):
    the master loads a model only if it is still the one the probe loaded."""
    import _config
    model = cfg['engine'].get('model') or ''
    if not model:
        return None
    path = os.path.join(_config.base_dir(cfg), os.path.expanduser(model))
    if not os.path.isdir(path):
        return None
    out = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            out.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    return out


def probe_pcm(rate, secs=1.0):
    """Signed 16-bit mono PCM: a few tones with a rising pitch, something to decode."""
    n = int(rate * secs)
    samples = array.array('h', (int(8000 * math.sin(2 * math.pi * (200 + 300 * i / n) * i / rate)
                                    * (0.5 + 0.5 * math.sin(2 * math.pi * 3 * i / rate))) for i in range(n)))
    if sys.byteorder != 'little':
        samples.byteswap()
    return samples.tobytes()


def engine_settings(cfg):
    """The [engine] section as JSON gives it back, to tell whether the probe tried the same one."""
    return json.loads(json.dumps(dict(cfg['engine']), default=str))


class Probe:
    """A probe process for a new app.ini's engine; poll() says how it ended."""

    def __init__(self, cfg, cfg_path):
        self.cfg = cfg
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), cfg_path],
                                     stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                     close_fds=True, cwd=os.getcwd())
        self.deadline = time.monotonic() + PROBE_TIMEOUT_SECS

    @property
    def pid(self):
        return self.proc.pid

    def poll(self, now=None):
        """None while it runs; then (ok, message, fingerprint)."""
        code = self.proc.poll()
        if code is None:
            if (now or time.monotonic()) < self.deadline:
                return None
            self.cancel()
            return False, 'the probe did not finish within %g s' % PROBE_TIMEOUT_SECS, None
        self.out.seek(0)
        text = self.out.read().decode('utf-8', 'replace')
        self.out.close()
        for line in reversed(text.splitlines()):
            if line.startswith(PROBE_MARK):
                try:
                    result = json.loads(line[len(PROBE_MARK):])
                except ValueError:
                    break
                if code == 0 and result.get('ok') and result.get('engine') != engine_settings(self.cfg):
                    return False, 'app.ini changed while the probe ran: reload again', None
                if code == 0 and result.get('ok'):
                    return True, result.get('text', ''), result.get('fingerprint')
                return False, result.get('error') or 'exit status %d' % code, None
        how = 'was killed by signal %d' % -code if code < 0 else 'exited with status %d' % code
        tail = ' '.join(text[-OUTPUT_TAIL:].split())
        return False, 'the probe %s before it answered; its last output: %s' % (how, tail or '(none)'), None

    def cancel(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.out.closed:
            self.out.close()


def _answer(**result):
    sys.stdout.write('\n' + PROBE_MARK + json.dumps(result) + '\n')
    sys.stdout.flush()


def probe_main(cfg_path):
    """The probe process: load the engine app.ini names and recognise a second of audio."""
    import _config
    import _engine
    try:
        cfg = _config.load(cfg_path)
        before = model_fingerprint(cfg)
        engine = _engine.make_engine(cfg)
        engine.load()
        engine.open()
        text = engine.recognize(probe_pcm(engine.sample_rate)).text if engine.embedded else ''
    except (_config.ConfigError, _engine.EngineError, OSError, RuntimeError, ValueError) as exc:
        _answer(ok=False, error='%s: %s' % (type(exc).__name__, exc))
        return 1
    after = model_fingerprint(cfg)
    if before != after:
        _answer(ok=False, error='the model folder changed while it was being loaded')
        return 1
    _answer(ok=True, text=text, fingerprint=after, engine=engine_settings(cfg))
    return 0


class Trial:
    """The one probe a reload may be waiting on: started for a new engine, checked from the
    master's tick, and `apply(cfg)` called only when it passed on an unchanged model."""

    def __init__(self, engine_name, apply):
        self.engine_name, self.apply = engine_name, apply
        self.probe = None

    def start(self, cfg, path):
        self.probe = Probe(cfg, path)
        log.info('master: reload of %s waits for the new engine (%s %s) to pass a probe in pid %d',
                 path, cfg['engine']['type'], cfg['engine']['model'] or '(default model)', self.probe.pid)

    def cancel(self, why):
        if self.probe is not None:
            log.warning('master: engine probe pid %d abandoned: %s', self.probe.pid, why)
            self.probe.cancel()
            self.probe = None

    def check(self, now):
        result = self.probe.poll(now) if self.probe is not None else None
        if result is None:
            return
        cfg, self.probe = self.probe.cfg, None
        ok, message, fingerprint = result
        if not ok:
            log.error('master: reload refused: the new engine (%s %s) failed its probe: %s; keeping %s and the '
                      'running configuration', cfg['engine']['type'], cfg['engine']['model'] or '(default model)',
                      message, self.engine_name())
            return
        if fingerprint != model_fingerprint(cfg):
            log.error('master: reload refused: the model folder changed after its probe; keeping %s',
                      self.engine_name())
            return
        log.info('master: the new engine passed its probe (heard %r)', message[:80])
        self.apply(cfg)


if __name__ == '__main__':
    sys.exit(probe_main(sys.argv[1]))
