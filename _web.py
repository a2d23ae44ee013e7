"""The web process (`svcmgr: web`): a FastAPI application served by uvicorn (the API, the
dashboard, /metrics) and its end of the link to the master. Requests become tasks only through
the master's admission; what it shows comes from the master's snapshot and the records of ended
tasks. The master respawns it when it dies; uploads it leaves half-written are removed at its start.
"""
import asyncio
import collections
import glob
import itertools
import json
import logging
import os
import socket
import threading
import time

import _children
import _config
from _link import encode_line, take_lines
from _states import LinkMsg, Source

log = logging.getLogger('web')

RECENT = 5000                # finished tasks kept for the dashboard and the task list
STATUS_SECS = 1.0
GRACEFUL_SECS = 3            # at stop, requests in flight get this long before they are cut
LISTEN_BACKLOG = 128


class MasterGone(Exception):
    """The link to the master is closed or it did not answer in time."""


class Waiter(threading.Event):
    """The end of one admitted task, set by the link's reader thread (the records line travels
    beside it); a thread waits with wait(), a request on the event loop with `await until(t)`."""

    def __init__(self):
        super().__init__()
        self._callbacks = []
        self._cb_lock = threading.Lock()

    def set(self):
        super().set()
        with self._cb_lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def _on_set(self, callback):
        with self._cb_lock:
            if not self.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def _off(self, callback):
        with self._cb_lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    async def until(self, timeout):
        """True once set, False after `timeout` s; no thread is held while it waits."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def wake():
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(True))
            except RuntimeError:
                pass        # the loop has closed: nobody waits any more
        self._on_set(wake)
        try:
            return await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._off(wake)


class MasterLink:
    """The web's end of the socketpair: numbered requests with waiting threads, and a reader
    thread that wakes them, keeps the recent records and removes finished uploads."""

    def __init__(self, sock, upload_dir, keep_uploads):
        self.sock = sock
        self.upload_dir = upload_dir
        self.keep_uploads = keep_uploads
        self.wlock = threading.Lock()
        self.lock = threading.Lock()
        self.rids = itertools.count(1)
        self.replies = {}                       # rid -> [Event, reply]
        self.ended = {}                         # speechID -> [Event, records line], for tasks admitted here
        self.uploads = set()                    # upload paths whose task has not ended
        self.recent = collections.deque(maxlen=RECENT)
        self.closed = False

    def send(self, *msg):
        data = encode_line(*msg)
        with self.wlock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise MasterGone('the master is not reachable: %s' % exc) from None

    def _ask(self, kind, args):
        """Send a numbered request; (rid, the slot its answer lands in)."""
        rid = next(self.rids)
        slot = [Waiter(), None]
        with self.lock:
            if self.closed:
                raise MasterGone('the master is not reachable')
            self.replies[rid] = slot
        try:
            self.send(kind, rid, *args)
        except MasterGone:
            self._forget(rid)
            raise
        return rid, slot

    def _forget(self, rid):
        with self.lock:
            self.replies.pop(rid, None)

    @staticmethod
    def _answer(slot, answered, timeout):
        if not answered:
            raise MasterGone('the master did not answer within %g s' % timeout)
        if slot[1] is None:
            raise MasterGone('the master is not reachable')
        return slot[1]

    def request(self, kind, *args, timeout=10.0):
        """The master's answer (blocking: a thread's call)."""
        rid, slot = self._ask(kind, args)
        try:
            answered = slot[0].wait(timeout)
        finally:
            self._forget(rid)
        return self._answer(slot, answered, timeout)

    async def arequest(self, kind, *args, timeout=10.0):
        """The master's answer, awaited on the event loop (no thread held)."""
        rid, slot = self._ask(kind, args)
        try:
            answered = await slot[0].until(timeout)
        finally:
            self._forget(rid)
        return self._answer(slot, answered, timeout)

    def snapshot(self, timeout=5.0, tasks=True):
        return self.request(LinkMsg.QUERY, tasks, timeout=timeout)[2]

    async def asnapshot(self, timeout=5.0, tasks=True):
        return (await self.arequest(LinkMsg.QUERY, tasks, timeout=timeout))[2]

    def submit(self, req, upload=None):
        """('admitted', speechID, waiter) or ('rejected', result, message); `upload`: the file this
        task owns, removed when it ends."""
        if upload:
            with self.lock:
                self.uploads.add(upload)
        reply = self.request(LinkMsg.SUBMIT, req)
        if reply[0] == LinkMsg.ADMITTED.value:
            return 'admitted', reply[2], reply[3]
        with self.lock:
            self.uploads.discard(upload)
        return 'rejected', reply[2], reply[3]

    # ------------------------------------------------------------ reader thread

    def reader(self):
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                buf += data
                for line in take_lines(buf):
                    try:
                        self.on_message(json.loads(line))
                    except (ValueError, IndexError, KeyError, TypeError):
                        log.error('web: unreadable message from the master: %r', line[:200])
        except OSError as exc:
            log.warning('web: link to the master broken: %s', exc)
        with self.lock:
            self.closed = True
            slots = list(self.replies.values()) + list(self.ended.values())
        for slot in slots:
            slot[0].set()
        log.info('web: the master closed the link')

    def on_message(self, msg):
        kind = LinkMsg(msg[0])
        if kind in (LinkMsg.ADMITTED, LinkMsg.REJECTED, LinkMsg.SNAPSHOT):
            with self.lock:
                if kind == LinkMsg.ADMITTED:
                    # Before the waiting thread wakes: the task's end may be the very next message,
                    # so the waiter travels with the reply.
                    waiter = self.ended[msg[2]] = [Waiter(), None]
                    msg = msg + [waiter]
                slot = self.replies.get(msg[1])
            if slot is not None:
                slot[1] = msg
                slot[0].set()
        elif kind == LinkMsg.ENDED:
            self.on_ended(msg[1])
        elif kind == LinkMsg.STOP:
            _STATE['stopping'] = True
        else:
            log.warning('web: unexpected message %r from the master', kind)

    def on_ended(self, line):
        sid = line['data']['speechID']
        self.recent.append(line)
        with self.lock:
            slot = self.ended.pop(sid, None)
        if slot is not None:
            slot[1] = line
            slot[0].set()
        if line.get('source') == Source.HTTP.value:
            self.remove_upload(line)

    def remove_upload(self, line):
        req = line.get('request') or {}
        path = os.path.join(str(req.get('filePath') or ''), str(req.get('fileID') or ''))
        with self.lock:
            ours = path in self.uploads
            self.uploads.discard(path)
        if ours and not self.keep_uploads:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error('web: cannot remove upload %s: %s', path, exc)

    # ------------------------------------------------------------ start-up

    def adopt_uploads(self):
        """At start: `.part` files a killed web process left are removed; finished uploads of
        tasks still running are ours to remove when they end, the rest are removed now."""
        for path in glob.glob(os.path.join(glob.escape(self.upload_dir), '*.part')):
            log.info('web: removing the partial upload %s left by an earlier web process', path)
            _unlink(path)
        try:
            running = {os.path.join(r.get('filePath') or '', r.get('fileID') or '')
                       for r in self.snapshot(timeout=30)['tasks'] if r.get('source') == Source.HTTP.value}
        except MasterGone:
            return
        for path in glob.glob(os.path.join(glob.escape(self.upload_dir), '*')):
            if path in running:
                with self.lock:
                    self.uploads.add(path)
            elif not self.keep_uploads and os.path.isfile(path):
                log.info('web: removing the upload %s of a task that ended while no web process ran', path)
                _unlink(path)

    def load_recent(self, records_dir):
        """The last finished tasks from the records files, for a dashboard that starts afresh."""
        names = sorted(glob.glob(os.path.join(glob.escape(records_dir), '[0-9]' * 8 + '.json')))[-2:]
        for name in names:
            try:
                with open(name, encoding='utf-8', errors='replace') as f:
                    for line in collections.deque(f, maxlen=RECENT):
                        try:
                            self.recent.append(json.loads(line))
                        except ValueError:
                            continue
            except OSError as exc:
                log.warning('web: cannot read %s: %s', name, exc)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


_STATE = {'stopping': False}


def listen(ip, port):
    """The listening socket, bound before uvicorn starts so a port in use fails the start."""
    # IPPROTO_TCP named: asyncio turns Nagle off only on sockets whose proto says TCP, and the
    # accepted ones inherit it (with 0, each answer waited ~40 ms for the client's delayed ACK).
    sock = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class Web:
    """The web process: settings, the link, the server and its counters."""

    def __init__(self, sock, cfg, master_pid, close_fds=()):
        self.sock = sock
        self.cfg = cfg
        self.master_pid = master_pid
        self.close_fds = close_fds
        h = cfg['http']
        self.tokens = [t.encode('utf-8') for t in h['tokens']]
        self.max_upload = int(float(h['max_upload_mb']) * (1 << 20))
        self.upload_dir = os.path.realpath(h['upload_path'])
        self.max_uploads = int(h['max_uploads'])
        self.uploading = 0                  # uploads being received (only the event loop counts)
        self.roots = [os.path.realpath(r) for r in cfg['directory']['allowed_roots']]   # not upload_path
        self.records_dir = _config.records_dir(cfg)
        import _webhook
        self.outbox_dir = _webhook.outbox_dir(cfg)
        self.timeout = float(cfg['setting']['session_timeout_secs'])
        self.engine = cfg['engine']['type']
        self.link = MasterLink(sock, self.upload_dir, bool(h['keep_uploads']))
        self.counts = collections.Counter()
        self.stopping = False
        self.reopen = False

    def run(self):
        if not _children.become_child(self, self.cfg, 'svcmgr: web', 'web', self.master_pid,
                                      self.close_fds, keep=(self.sock.fileno(),)):
            return
        import uvicorn      # the server and the application, only in this process
        import _web_api
        self.sock.setblocking(True)
        h = self.cfg['http']
        try:
            listener = listen(h['ip'], int(h['port']))
        except OSError as exc:
            log.error('web: cannot listen on %s:%s: %s', h['ip'], h['port'], exc)
            raise SystemExit(1)
        os.makedirs(self.upload_dir, exist_ok=True)
        threading.Thread(target=self.link.reader, name='link', daemon=True).start()
        self.link.load_recent(self.records_dir)
        self.link.adopt_uploads()
        # uvicorn in a thread of its own: it installs no signal handlers there, so SIGTERM stays
        # become_child's flag and the loop below (the link, the status, log reopening) decides.
        server = uvicorn.Server(uvicorn.Config(
            _web_api.build(self), http='h11', loop='asyncio', lifespan='on', log_config=None,
            access_log=False, server_header=False, timeout_graceful_shutdown=GRACEFUL_SECS))
        http = threading.Thread(target=server.run, kwargs={'sockets': [listener]}, name='http', daemon=True)
        http.start()
        log.info('web: listening on http://%s:%s (pid %d)', h['ip'], h['port'], os.getpid())
        self.loop(http)
        server.should_exit = True
        http.join(GRACEFUL_SECS + 2)
        listener.close()
        log.info('web: stopped')

    # ------------------------------------------------------------ what the routes read from disk

    def find_record(self, sid, days=31):
        """The records line of a finished speechID, newest day first; None if not found."""
        names = sorted(glob.glob(os.path.join(glob.escape(self.records_dir), '[0-9]' * 8 + '.json')))
        needle = '"speechID": %s' % json.dumps(sid)
        for name in reversed(names[-days:]):
            found = None
            try:
                with open(name, encoding='utf-8', errors='replace') as f:
                    for line in f:
                        if needle in line:
                            try:
                                found = json.loads(line)
                            except ValueError:
                                continue
            except OSError:
                continue
            if found is not None:
                return found
        return None

    def failed_webhooks(self, limit=100):
        import _webhook
        box = _webhook.Outbox(self.outbox_dir)
        out = []
        for name in box.names(failed=True)[-limit:]:
            try:
                entry = box.read(name, failed=True, adopt=False) or {}
            except _webhook.EntryError as exc:
                entry = {'last_error': 'unreadable: %s' % exc}
            out.append({'name': name, 'speechID': entry.get('speechID'), 'attempts': entry.get('attempts'),
                        'failedAt': entry.get('failed_at'), 'lastError': entry.get('last_error'),
                        'lastStatus': entry.get('last_status')})
        return out

    def redeliver(self, name):
        """A failed delivery back into the outbox (the daemon's senders find it at their next rescan)."""
        import _webhook
        box = _webhook.Outbox(self.outbox_dir)
        if name not in box.names(failed=True):
            raise FileNotFoundError(name)
        log.info('web: failed webhook delivery %s redelivered', name)
        return box.redeliver(name)

    def loop(self, http):
        sent = None
        while not (self.stopping or _STATE['stopping'] or self.link.closed):
            if not http.is_alive():
                log.error('web: the HTTP server ended by itself')
                raise SystemExit(1)
            if os.getppid() != self.master_pid:
                log.warning('web: master is gone, exiting')
                return
            if self.reopen:
                self.reopen = False
                _config.reopen_logs()
            status = dict(self.counts)
            if status != sent:
                try:
                    self.link.send(LinkMsg.STATUS, status)
                except MasterGone:
                    pass        # the reader notices the broken link and the loop ends
                sent = status
            time.sleep(STATUS_SECS / 4)


def main(sock, cfg, master_pid, close_fds=()):
    """Entry point of the web process (multiprocessing target)."""
    Web(sock, cfg, master_pid, close_fds).run()
