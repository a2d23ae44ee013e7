"""The web process (`svcmgr: web`): a threaded HTTP server (the API, the dashboard, /metrics)
and its end of the link to the master. Requests become tasks only through the master's
admission; what it shows comes from the master's snapshot and the records of ended tasks.
The master respawns it when it dies; uploads it leaves half-written are removed at its start.
"""
import collections
import glob
import itertools
import json
import logging
import os
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import _children
import _config
from _link import encode_line, take_lines
from _states import LinkMsg, Source

log = logging.getLogger('web')

RECENT = 5000                # finished tasks kept for the dashboard and the task list
STATUS_SECS = 1.0


class MasterGone(Exception):
    """The link to the master is closed or it did not answer in time."""


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

    def request(self, kind, *args, timeout=10.0):
        rid = next(self.rids)
        slot = [threading.Event(), None]
        with self.lock:
            if self.closed:
                raise MasterGone('the master is not reachable')
            self.replies[rid] = slot
        try:
            self.send(kind, rid, *args)
            if not slot[0].wait(timeout):
                raise MasterGone('the master did not answer within %g s' % timeout)
        finally:
            with self.lock:
                self.replies.pop(rid, None)
        if slot[1] is None:
            raise MasterGone('the master is not reachable')
        return slot[1]

    def snapshot(self, timeout=5.0, tasks=True):
        return self.request(LinkMsg.QUERY, tasks, timeout=timeout)[2]

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
                    waiter = self.ended[msg[2]] = [threading.Event(), None]
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


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, app):
        self.address_family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
        super().__init__(address, handler)
        self.app = app


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
        self.uploads = threading.BoundedSemaphore(int(h['max_uploads']))
        self.roots = [os.path.realpath(r) for r in cfg['directory']['allowed_roots']]   # not upload_path
        self.records_dir = _config.records_dir(cfg)
        self.outbox_dir = os.path.join(_config.base_dir(cfg), 'records', 'webhook')
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
        import _web_api   # the handler and what it needs, only in this process
        self.sock.setblocking(True)
        h = self.cfg['http']
        try:
            server = WebServer((h['ip'], int(h['port'])), _web_api.Handler, self)
        except OSError as exc:
            log.error('web: cannot listen on %s:%s: %s', h['ip'], h['port'], exc)
            raise SystemExit(1)
        os.makedirs(self.upload_dir, exist_ok=True)
        threading.Thread(target=self.link.reader, name='link', daemon=True).start()
        self.link.load_recent(self.records_dir)
        self.link.adopt_uploads()
        threading.Thread(target=server.serve_forever, args=(0.2,), name='http', daemon=True).start()
        log.info('web: listening on http://%s:%s (pid %d)', h['ip'], h['port'], os.getpid())
        self.loop()
        server.shutdown()
        server.server_close()
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

    def loop(self):
        sent = None
        while not (self.stopping or _STATE['stopping'] or self.link.closed):
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
