"""The master's TCP side: the listening socket, the allow list, one Conn per client or
engine connection with its frame decoder and send buffer, eviction of connections that
hold the limit without sending whole frames, and out-of-descriptor shedding. Whole
frames go to `on_frame(conn, type, body)`; nothing here knows what a frame means.
"""
import errno
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import _packet
from _loop import READ, WRITE, send_some
from _packet import ProtocolError
from _states import Result, State

log = logging.getLogger('master')

MAX_SEND_BUFFER = 16 << 20


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    addr: tuple
    decoder: _packet.FrameDecoder
    wbuf: bytearray = field(default_factory=bytearray)
    tasks: set = field(default_factory=set)     # speechIDs of its tasks in progress
    partial_since: float = None
    closing: bool = False
    closed: bool = False
    engine: object = None     # the remote engine's state once it logged in on this connection
    frames: int = 0           # whole frames received
    opened: float = field(default_factory=time.monotonic)

    @property
    def name(self):
        return '%s:%s' % self.addr[:2] if isinstance(self.addr, tuple) else str(self.addr)


def make_listener(ip, port):
    family = socket.AF_INET6 if ':' in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(512)
    return sock


class ConnServer:
    """Accepts, reads, frames, sends and closes; `on_close(conn)` hears of every close."""

    def __init__(self, loop, cfg, counters, on_frame, on_close):
        self.loop = loop
        self.counters = counters
        self.on_frame = on_frame
        self.on_close = on_close
        self.listener = None
        self.conns = {}
        # One descriptor held in reserve, given up to shed a connection when none are left (EMFILE).
        self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.configure(cfg)

    def configure(self, cfg):
        s = cfg['server']
        self.max_conns = int(s['max_connections'])
        self.max_body = int(s['max_packet_bytes'])
        self.allow = [ipaddress.ip_network(n, strict=False) for n in s['allow']]
        self.partial_timeout = float(cfg['setting']['session_timeout_secs'])

    # ------------------------------------------------------------ listening

    def listen(self, listener):
        """Serve on `listener`, closing the one served before."""
        self.close_listener()
        listener.setblocking(False)
        self.listener = listener
        self.loop.add(listener, self._on_accept, None)

    def close_listener(self):
        if self.listener is not None:
            self.loop.remove(self.listener)
            self.listener.close()
            self.listener = None

    def _on_accept(self, mask):
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed_one_connection(exc)
                else:
                    log.error('master: accept failed: %s', exc)
                return
            if self.allow and not self._allowed(addr[0]):
                log.warning('master: connection from %s refused: not in [server] allow', addr[0])
                self._refuse(sock)
                continue
            if len(self.conns) >= self.max_conns and not self._evict_idle():
                log.warning('master: connection from %s:%s refused: max_connections %d reached',
                            addr[0], addr[1], self.max_conns)
                self._refuse(sock)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, addr, _packet.FrameDecoder(self.max_body))
            self.conns[sock.fileno()] = conn
            self.loop.add(sock, lambda mask, conn=conn: self._on_conn(conn, mask), conn)
            log.debug('master: connection from %s', conn.name)

    def _refuse(self, sock):
        sock.close()
        self.counters['refused'] += 1

    def _evict_idle(self):
        """At max_connections, make room by closing the connection that has held an
        incomplete frame longest, or one that never sent a whole frame: the shapes of
        slowloris, which would otherwise lock real clients out."""
        victims = [c for c in self.conns.values() if c.engine is None and not c.tasks
                   and (c.partial_since is not None or c.frames == 0)]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c.partial_since if c.partial_since is not None else c.opened)
        log.warning('master: max_connections %d reached: closing %s, which %s', self.max_conns, victim.name,
                    'holds an incomplete frame' if victim.partial_since is not None else 'never sent a frame')
        self.counters['evicted'] += 1
        self.close(victim)
        return True

    def _shed_one_connection(self, exc):
        """Out of file descriptors: the pending connection would keep the listener readable
        and the loop spinning. Accept it on a spare descriptor and close it at once."""
        log.error('master: accept failed: %s; refusing one connection', exc)
        self.counters['refused'] += 1
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        try:
            sock, _ = self.listener.accept()
            sock.close()
        except OSError:
            pass
        try:
            self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.spare_fd = None

    def _allowed(self, host):
        try:
            ip = ipaddress.ip_address(host.split('%')[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    # ------------------------------------------------------------ one connection

    def _on_conn(self, conn, mask):
        if mask & WRITE:
            self.flush(conn)
        if mask & READ and not conn.closed:
            self._read(conn)

    def _read(self, conn):
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info('master: %s: receive failed: %s', conn.name, exc)
            self.close(conn)
            return
        if not data:
            if conn.decoder.pending:
                log.warning('master: %s closed the connection inside a frame (%d bytes held)',
                            conn.name, conn.decoder.buffered)
            self.close(conn)
            return
        if conn.closing:
            return
        try:
            frames = conn.decoder.feed(data)
        except ProtocolError as exc:
            # Whole frames that arrived before the bad header are still answered.
            for ptype, body in exc.frames:
                self.on_frame(conn, ptype, body)
            self._framing_error(conn, exc)
            return
        conn.partial_since = (conn.partial_since or time.monotonic()) if conn.decoder.pending else None
        conn.frames += len(frames)
        for ptype, body in frames:
            if conn.closing:
                break
            self.on_frame(conn, ptype, body)

    def _framing_error(self, conn, exc):
        log.warning('master: %s: framing error: %s; closing', conn.name, exc)
        self.counters['framing_errors'] += 1
        if exc.ptype is not None and 1000 <= exc.ptype < 2000:
            body = _packet.error_body(None, Result.BAD_REQUEST, State.NONE, 'framing error: %s' % exc)
            self.send(conn, exc.ptype + 1000, body)
        self.close(conn, after_flush=True)

    def send(self, conn, ptype, body):
        """Queue one frame and send what the socket takes now; False when the connection is gone."""
        if conn.closed:
            return False
        conn.wbuf += _packet.encode(ptype, body)
        if len(conn.wbuf) > MAX_SEND_BUFFER:
            log.warning('master: %s does not read its answers (%d bytes waiting); closing', conn.name, len(conn.wbuf))
            self.close(conn)
            return False
        self.flush(conn)
        return True

    def flush(self, conn):
        if conn.closed:
            return
        error = send_some(conn.sock, conn.wbuf)
        if error is not None:
            log.info('master: %s: send failed: %s', conn.name, error)
            self.close(conn)
            return
        if not conn.wbuf and conn.closing:
            self.close(conn)
            return
        self.loop.want_write(conn.sock, bool(conn.wbuf))

    def close(self, conn, after_flush=False):
        if conn.closed:
            return
        if after_flush and conn.wbuf:
            conn.closing = True
            return
        conn.closed = True
        self.loop.remove(conn.sock)
        self.conns.pop(conn.sock.fileno(), None)
        try:
            conn.sock.close()
        except OSError:
            pass
        self.on_close(conn)

    # ------------------------------------------------------------ timers and the end

    def tick(self, now):
        for conn in list(self.conns.values()):
            if conn.partial_since is not None and now - conn.partial_since > self.partial_timeout:
                log.warning('master: %s held an incomplete frame (%d bytes) for over %g s; closing',
                            conn.name, conn.decoder.buffered, self.partial_timeout)
                self.close(conn)

    def finish(self, timeout=2.0):
        """At stop: send what is still buffered (for at most `timeout`), then close everything."""
        deadline = time.monotonic() + timeout
        while any(c.wbuf for c in self.conns.values()) and time.monotonic() < deadline:
            self.loop.run_once(0.05, lambda owner: None)
        for conn in list(self.conns.values()):
            self.close(conn)
