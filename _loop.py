"""The master's one selectors loop: a handler per file object, write interest switched on
only while something waits to be sent, a wake-up socket that signal handlers write to,
and the non-blocking buffered send that client connections and child links share.
"""
import logging
import selectors
import socket

log = logging.getLogger('master')

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class EventLoop:
    """Handlers are called as handler(mask); `owner` is what a failing handler is blamed on."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()

    def add(self, fileobj, handler, owner=None, events=READ):
        self.sel.register(fileobj, events, (handler, owner))

    def remove(self, fileobj):
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def want_write(self, fileobj, wanted):
        """Ask for EVENT_WRITE while `wanted` (data waits), only EVENT_READ otherwise."""
        try:
            key = self.sel.get_key(fileobj)
        except (KeyError, ValueError):
            return
        events = READ | (WRITE if wanted else 0)
        if key.events != events:
            self.sel.modify(fileobj, events, key.data)

    def fds(self):
        """Every descriptor in the loop: what a forked child must close."""
        return [key.fd for key in self.sel.get_map().values()]

    def run_once(self, timeout, on_error):
        """Dispatch the ready events; a handler that raises is logged and `on_error(owner)`
        decides what to drop, so one bad event never stops the service."""
        for key, mask in self.sel.select(timeout):
            handler, owner = key.data
            try:
                handler(mask)
            except Exception:  # the loop's one catch-all: one bad event must not stop the service
                log.error('master: error handling an event of %r', owner, exc_info=True)
                on_error(owner)


def wake_pair():
    """A non-blocking socketpair: signal handlers (or other threads) write to [1], the loop
    reads [0]."""
    r, w = socket.socketpair()
    for s in (r, w):
        s.setblocking(False)
    return r, w


def drain(sock):
    """Read a wake-up socket empty."""
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def send_some(sock, wbuf):
    """Send what the socket takes now from bytearray `wbuf` (sent bytes are cut off);
    returns the OSError that ended the connection, or None."""
    while wbuf:
        try:
            n = sock.send(wbuf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return exc
        del wbuf[:n]
    return None
