"""What every child of the master (PacketAgent workers, the scanner) does first after
the fork: drop the master's descriptors, take its process title and log file, die
with the master, and let signals only set flags that its own loop acts on; and what
the master needs to supervise children: the fork context, exit reasons, respawn backoff.
"""
import ctypes
import logging
import multiprocessing
import os
import signal
import socket

import _config

log = logging.getLogger('children')

PR_SET_PDEATHSIG = 1


def set_title(title):
    """The process title `status` and `ps` show (e.g. 'svcmgr: worker 2')."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def title_of(proc):
    """The title of a psutil.Process as set_title wrote it. psutil splits a rewritten
    command line at spaces or at NULs depending on how it was padded, so join it back."""
    return ' '.join(proc.cmdline()).strip()


def become_child(owner, cfg, title, log_name, master_pid, close_fds=(), keep=(), nice=0):
    """Set up a freshly forked child; False when the master is already gone.

    `owner` gets `stopping = True` on SIGTERM (finish the work in hand, then leave)
    and `reopen = True` on SIGUSR1 (reopen log files).
    """
    # Holding the master's sockets would keep client connections and the port open after it closes them.
    for fd in close_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    set_title(title)
    _config.setup_logging(cfg, log_name)
    owner.stopping = False
    owner.reopen = False

    def term(signum, frame):
        owner.stopping = True

    def usr1(signum, frame):
        owner.reopen = True
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGUSR1, usr1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        # The master's SIGKILL must not leave us running.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.warning('%s: prctl(PR_SET_PDEATHSIG) unavailable', log_name)
    if os.getppid() != master_pid:
        return False
    if nice:
        os.nice(nice)
    return True


# ---------------------------------------------------------------- supervision (the master's side)

# Children are forked, named explicitly (rq's worker_pool does the same): the model is
# loaded once before the fork and its pages are shared.
MP = multiprocessing.get_context('fork')

# A child that exits this soon after it started failed to boot: respawning it at once
# would only make it fail again in a loop (gunicorn's WORKER_BOOT_ERROR idea).
BOOT_GRACE_SECS = 2.0
MAX_RESPAWN_DELAY_SECS = 30.0


def exit_reason(code):
    """'signal 9' or 'exit status 0' for a Process.exitcode."""
    return 'signal %d' % -code if code is not None and code < 0 else 'exit status %s' % code


class Backoff:
    """The delay before a child is started again: `base` after a normal death, doubling
    from 1 s up to MAX_RESPAWN_DELAY_SECS while it keeps failing within BOOT_GRACE_SECS."""

    def __init__(self, base=0.0):
        self.base = base
        self.delay = 0.0

    def next(self, lived, excused=False):
        """The delay after a child that lived `lived` seconds; `excused`: its quick end was
        not its own fault (killed, or it held a task that may have killed it)."""
        if lived < BOOT_GRACE_SECS and not excused:
            self.delay = min(MAX_RESPAWN_DELAY_SECS, max(1.0, 2 * self.delay))
        else:
            self.delay = self.base
        return self.delay

    @property
    def failing(self):
        return self.delay > self.base


def signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def sd_notify(state):
    """Tell systemd (Type=notify) about the service: READY=1 once serving, STOPPING=1, RELOADING=1.
    Does nothing unless started by systemd with $NOTIFY_SOCKET; never raises."""
    where = os.environ.get('NOTIFY_SOCKET')
    if not where:
        return False
    if where.startswith('@'):
        where = '\0' + where[1:]       # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(where)
            sock.sendall(state.encode('ascii'))
        return True
    except OSError as exc:
        log.warning('master: cannot notify systemd at %s: %s', os.environ.get('NOTIFY_SOCKET'), exc)
        return False
