"""A helper process of the master (the scanner, the web process) and the master's end of
the link to it: one socketpair carrying JSON lines, each line a list [kind, ...]. The master's
end is non-blocking and buffered, so a child stuck on a dead NFS mount cannot stop the loop;
the child is respawned with backoff when it dies and stopped or replaced with the rest.
"""
import collections
import json
import logging
import signal
import socket
import time

import _children
from _loop import READ, WRITE, drain, send_some, wake_pair
from _states import LinkMsg

log = logging.getLogger('master')

MAX_MESSAGE = 4 << 20         # a line longer than this means the other end is broken
MAX_SEND_BUFFER = 16 << 20    # the child has stopped reading: it hangs
READS_PER_EVENT = 64          # then let the loop serve others


def encode_line(*msg):
    return json.dumps(msg, allow_nan=False).encode('ascii') + b'\n'


def take_lines(buf):
    """Cut the complete lines (JSON messages, one a line) off the front of bytearray `buf`."""
    end = buf.rfind(b'\n')
    if end < 0:
        return []
    lines = bytes(buf[:end]).split(b'\n')
    del buf[:end + 1]
    return lines


class ChildLink:
    """The master's end of one supervised child. Subclasses name the child (`role`), its
    entry point (`target(sock, cfg, master_pid, close_fds)`), whether it runs (`enabled`)
    and what its messages do (`on_message`)."""

    role = 'child'
    restart_delay = 1.0

    def __init__(self, loop, cfg, master_pid, extra_fds):
        self.loop = loop
        self.cfg = cfg
        self.master_pid = master_pid
        self.extra_fds = extra_fds      # () -> descriptors of the master the child must close
        self.proc = None
        self.sock = None
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.status = {}
        self.started = None
        self.respawn_at = None
        self.backoff = _children.Backoff(self.restart_delay)
        self.restarts = 0
        self.stopping = False
        self.reloading = False
        # Notices for the child from the reporter thread (post()), sent from the loop (tell()).
        self.notices = collections.deque()
        self.notify_r, self.notify_w = wake_pair()

    # ------------------------------------------------------------ what subclasses give

    @property
    def enabled(self):
        return True

    def target(self, sock, cfg, master_pid, close_fds):
        raise NotImplementedError

    def on_message(self, kind, msg):
        log.warning('master: %s sent an unknown message %r', self.role, kind)

    def on_spawned(self):
        """Called once a new child runs (tell it what it needs to know)."""

    def on_gone(self):
        """Called once the child has exited and its end is closed."""

    def tell(self, notice):
        """Send one notice that post() queued (in the master's loop)."""
        raise NotImplementedError

    # ------------------------------------------------------------ notices from the reporter thread

    def post(self, notice):
        """Queue `notice` for the child and wake the loop (called from the reporter thread)."""
        self.notices.append(notice)
        try:
            self.notify_w.send(b'\0')
        except OSError:
            pass            # full: the loop is already woken

    def _on_notify(self, mask):
        drain(self.notify_r)
        self.flush_notices()

    def flush_notices(self):
        while self.notices:
            self.tell(self.notices.popleft())

    # ------------------------------------------------------------ process

    @property
    def gone(self):
        return self.proc is None

    def start(self):
        self.loop.add(self.notify_r, self._on_notify, self)
        if self.enabled:
            self.spawn()

    def spawn(self):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        inherited = self.loop.fds() + [ours.fileno()] + list(self.extra_fds())
        proc = _children.MP.Process(target=self.target, name=self.role,
                                    args=(theirs, self.cfg, self.master_pid, inherited))
        proc.start()
        theirs.close()
        self.proc, self.sock, self.started = proc, ours, time.monotonic()
        self.rbuf.clear()
        self.wbuf.clear()
        self.status = {}
        self.respawn_at = None
        self.loop.add(ours, self._on_sock, self)
        self.loop.add(proc.sentinel, self._on_exit, self)
        log.info('master: %s started with pid %d', self.role, proc.pid)
        self.on_spawned()

    def _on_exit(self, mask):
        proc = self.proc
        if self.sock is not None:
            self._read()                # what it said last still counts
        proc.join(0.5)
        self.loop.remove(proc.sentinel)
        self._close_sock()
        self.proc = None
        why = _children.exit_reason(proc.exitcode)
        self.on_gone()
        if self.stopping or self.reloading:
            log.info('master: %s (pid %d) ended with %s', self.role, proc.pid, why)
            self.respawn_at = None if self.stopping else time.monotonic()
            self.reloading = False
            return
        delay = self.backoff.next(time.monotonic() - self.started)
        self.respawn_at = time.monotonic() + delay
        self.restarts += 1
        log.error('master: %s (pid %d) died with %s; a new one in %.0f s', self.role, proc.pid, why, delay)

    def _close_sock(self):
        if self.sock is not None:
            self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        self.wbuf.clear()

    # ------------------------------------------------------------ messages

    def _on_sock(self, mask):
        if mask & WRITE:
            self._flush()
        if mask & READ and self.sock is not None:
            self._read()

    def _read(self):
        for _ in range(READS_PER_EVENT):
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b''
            if not data:
                self.loop.remove(self.sock)
                break
            self.rbuf += data
        for line in take_lines(self.rbuf):
            try:
                msg = json.loads(line)
                kind = LinkMsg(msg[0])
            except (ValueError, IndexError, KeyError, TypeError):
                log.error('master: unreadable message from the %s: %r', self.role, line[:200])
                continue
            if kind == LinkMsg.STATUS and len(msg) > 1 and isinstance(msg[1], dict):
                self.status = msg[1]
            else:
                self.on_message(kind, msg)
        if len(self.rbuf) > MAX_MESSAGE:
            log.error('master: the %s sent %d bytes without an end of line; killing it', self.role, len(self.rbuf))
            self.rbuf.clear()
            self.kill()

    def send(self, *msg):
        if self.sock is None:
            return
        self.wbuf += encode_line(*msg)
        if len(self.wbuf) > MAX_SEND_BUFFER:
            log.error('master: the %s has not read %d bytes of messages; killing it', self.role, len(self.wbuf))
            self.kill()
            self.wbuf.clear()
            return
        self._flush()

    def _flush(self):
        if self.sock is None:
            return
        error = send_some(self.sock, self.wbuf)
        if error is not None:
            log.warning('master: cannot write to the %s: %s', self.role, error)
            self.wbuf.clear()
        self.loop.want_write(self.sock, bool(self.wbuf))

    # ------------------------------------------------------------ the master's timers and commands

    def tick(self, now):
        self.flush_notices()
        if self.sock is None and self.respawn_at is not None and now >= self.respawn_at \
                and not self.stopping and self.enabled:
            self.spawn()

    def describe(self):
        """What Monitor shows of the child: its own last status plus its supervision."""
        if self.proc is None and not self.enabled:
            return {'enabled': False}
        body = dict(self.status)
        body.update({'enabled': self.enabled, 'pid': self.proc.pid if self.proc else None,
                     'alive': self.proc is not None, 'restarts': self.restarts})
        return body

    def stop(self):
        """Graceful stop of the daemon."""
        self.stopping = True
        if self.sock is not None:
            self.send(LinkMsg.STOP)
        elif self.proc is not None:
            _children.signal_pid(self.proc.pid, signal.SIGTERM)

    def reload(self, cfg):
        """app.ini was reloaded: a new child with the new settings once the old one has left."""
        self.cfg = cfg
        if self.proc is not None:
            self.reloading = True
            self.send(LinkMsg.STOP)
        elif self.enabled:
            self.respawn_at = time.monotonic()

    def signal(self, sig):
        if self.proc is not None:
            _children.signal_pid(self.proc.pid, sig)

    def kill(self):
        self.signal(signal.SIGKILL)
