"""The client commands of svcmgr.py: transcribe and monitor, spoken over the packet
protocol to the running daemon like any 1.0 client would.

transcribe runs a whole batch on one connection: it keeps at most the daemon's free
capacity in flight (Monitor's maxTasks, queued and running), sends the next file as each
answer arrives, and sends again a file refused with 6 (busy) once there is room, so a user
never sees a 6. What it shows and writes is _outputs.py.
"""
import collections
import json
import os
import select
import socket
import sys
import time

import _config
import _outputs
import _packet
from _packet import Type

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
BUSY = '6'
RESULT_NAMES = {'0': 'OK', '1': 'speechID in use', '2': 'unsupported', '3': 'no engine or stopping',
                '4': 'file not found', '5': 'timeout', '6': 'busy', '7': 'bad request',
                '8': 'client left', '9': 'failed', 'lost': 'no answer'}


class Unreachable(Exception):
    pass


def daemon_address(cfg):
    host = cfg['server']['ip']
    if host in ('0.0.0.0', '::'):
        host = '127.0.0.1'
    return host, int(cfg['server']['port'])


def connect(cfg):
    """A connection to the daemon, or Unreachable with what to do about it."""
    host, port = daemon_address(cfg)
    try:
        return socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        raise Unreachable(
            'svcmgr: cannot reach the daemon at %s:%d (%s). Is it running? `svcmgr status` tells, '
            '`svcmgr start` starts it; it listens where [server] ip and port of %s say.'
            % (host, port, exc.strerror or exc, cfg.filename)) from None


def client_exchange(cfg, frames, expect, timeout):
    """Send frames to the running daemon and return `expect` answers (type, dict)."""
    sock = connect(cfg)
    sock.settimeout(timeout)
    for ptype, body in frames:
        sock.sendall(_packet.encode(ptype, body))
    decoder = _packet.FrameDecoder(64 << 20)
    answers = []
    while len(answers) < expect:
        data = sock.recv(1 << 16)
        if not data:
            break
        for ptype, body in decoder.feed(data):
            answers.append((ptype, json.loads(body.decode('utf-8'))))
    sock.close()
    return answers


def local_problem(cfg, path):
    """(result, message) for a file the daemon would refuse, said with what to change; None if fine."""
    real = os.path.realpath(path)
    roots = cfg['directory']['allowed_roots']
    if not _config.inside(real, roots):
        return '7', ('%s is outside the allowed roots (%s); add its folder to [directory] allowed_roots in %s'
                     ' and run `svcmgr reload`' % (path, ', '.join(roots), cfg.filename))
    if _config.in_drop_folder(cfg, real):
        return '7', ('%s lies in the drop folder [directory] audio_source_path (%s): the scanner takes it by'
                     ' itself; leave it there, or move it to another allowed root to transcribe it here'
                     % (path, os.path.realpath(cfg['directory']['audio_source_path'])))
    if not os.path.isfile(path):
        return '4', 'no such file: %s' % path
    return None


class Batch:
    """One transcribe run: what is left to send, what is in flight, and what came back."""

    def __init__(self, cfg, paths, opts, progress, out=None):
        self.cfg, self.opts, self.progress = cfg, opts, progress
        self.out = out or sys.stdout
        self.todo = collections.deque(paths)
        self.inflight = {}                  # speechID -> path
        self.results = collections.Counter()
        self.window = 1
        self.hold_until, self.backoff = 0.0, 0.05
        self.plan = _outputs.plan_outputs(opts.items, opts.format, opts.out, opts.beside)
        self.timeout = float(cfg['setting']['session_timeout_secs']) + 30

    def size_window(self, sock, decoder):
        """In flight at once: the daemon's free capacity (Monitor), at most --jobs, by default
        two per worker (more would only queue, and a task's deadline starts when it is queued)."""
        sock.sendall(_packet.encode(Type.MONITOR, {'type': 'all'}))
        body = self.wait_for(sock, decoder, Type.MONITOR_RESP)
        queue = body.get('queue') or {}
        free = int(queue.get('maxTasks', 1)) - int(queue.get('pending', 0)) - int(queue.get('running', 0))
        wanted = self.opts.jobs or 2 * max(1, len(body.get('workers') or ()))
        self.window = max(1, min(free, wanted))

    def wait_for(self, sock, decoder, ptype):
        sock.settimeout(30)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError('the daemon closed the connection')
            for got, body in decoder.feed(data):
                if got == ptype:
                    return json.loads(body.decode('utf-8'))

    def send_more(self, sock):
        now = time.monotonic()
        while self.todo and len(self.inflight) < self.window and now >= self.hold_until:
            path = self.todo.popleft()
            sid = _packet.new_speech_id()
            req = {'speechID': sid, 'filePath': os.path.dirname(path), 'fileID': os.path.basename(path),
                   'fileName': os.path.basename(path)}
            if not self.opts.delete_source:
                req['keepSource'] = True
            if self.opts.format != 'text':
                req['segments'] = True
            sock.sendall(_packet.encode(Type.TRANSCRIBE, req))
            self.inflight[sid] = path

    def on_answer(self, body):
        path = self.inflight.pop(body.get('speechID'), None)
        if path is None:
            return
        result = str(body.get('result'))
        if result == BUSY:
            # Someone else took the room: send it again later, and keep fewer in flight.
            self.todo.appendleft(path)
            self.window = max(1, len(self.inflight))
            self.hold_until = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, 2.0)
            return
        self.backoff = 0.05
        self.finish(path, result, body)

    def finish(self, path, result, body):
        self.results[result] += 1
        self.progress.clear()
        if result == '0':
            self.emit_ok(path, body)
        else:
            self.out.write('%s\tERROR %s %s: %s\n' % (path, result, body.get('state', 'NONE'), body.get('message')))
        self.out.flush()
        self.progress.step(result == '0')

    def emit_ok(self, path, body):
        fmt, target = self.opts.format, self.plan.get(path)
        text = _outputs.render(fmt, path, body)
        if target:
            _outputs.write_file(target, text)
            if not self.opts.quiet:
                self.out.write('%s\t-> %s\n' % (path, target))
        elif fmt == 'text':
            if not self.opts.quiet:
                self.out.write('%s\t%s\n' % (path, body.get('transcript', '').replace('\n', '\n\t')))
        elif fmt == 'json':
            self.out.write(text)
        elif len(self.opts.items) > 1:
            self.out.write('==> %s <==\n%s' % (path, text))
        else:
            self.out.write(text)    # one file's subtitles, as they are, for a redirect

    def run(self, sock):
        decoder = _packet.FrameDecoder(64 << 20)
        self.size_window(sock, decoder)
        last_answer = time.monotonic()
        while self.todo or self.inflight:
            self.send_more(sock)
            wait = 0.5 if not self.todo or self.hold_until <= time.monotonic() else \
                max(0.0, self.hold_until - time.monotonic())
            ready, _, _ = select.select([sock], [], [], min(wait, 0.5))
            self.progress.draw()
            if not ready:
                if self.inflight and time.monotonic() - last_answer > self.timeout:
                    raise ConnectionError('no answer from the daemon for %.0f s' % self.timeout)
                continue
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError('the daemon closed the connection')
            for ptype, body in decoder.feed(data):
                if ptype == Type.TRANSCRIBE_RESP:
                    self.on_answer(json.loads(body.decode('utf-8')))
                    last_answer = time.monotonic()

    def abandon(self, why):
        """The connection is gone: what was not answered is counted as `lost`."""
        for path in list(self.inflight.values()) + list(self.todo):
            self.finish(path, 'lost', {'state': 'NONE', 'message': why})
        self.inflight.clear()
        self.todo.clear()


def summary(results, stream):
    total = sum(results.values())
    parts = ['%d OK' % results.get('0', 0)]
    for code in sorted(c for c in results if c != '0'):
        parts.append('%d %s (%s)' % (results[code], RESULT_NAMES.get(code, 'result %s' % code), code))
    stream.write('svcmgr: %d file(s): %s\n' % (total, ', '.join(parts)))


def cmd_transcribe(cfg, opts):
    """`svcmgr transcribe`: opts has paths, glob, format, out, beside, jobs, delete_source,
    progress (None = on a terminal), quiet. Exit 0 when every file gave 0, 1 when any failed,
    2 when nothing could be sent, 3 when the daemon cannot be reached."""
    opts.items = _outputs.expand(opts.paths, opts.glob, cfg['directory']['scan_extensions'])
    if not opts.items:
        print('svcmgr: no files to transcribe in %s (pattern %s)' % (
            ' '.join(opts.paths), opts.glob or ', '.join('*.' + e for e in cfg['directory']['scan_extensions'])),
            file=sys.stderr)
        return EXIT_USAGE
    progress = _outputs.Progress(len(opts.items), enabled=opts.progress)
    batch = Batch(cfg, [], opts, progress)
    for path, _rel in opts.items:
        problem = local_problem(cfg, path)
        if problem is None:
            batch.todo.append(path)
        else:
            batch.finish(path, problem[0], {'state': 'NONE', 'message': problem[1]})
    if batch.todo:
        try:
            sock = connect(cfg)
        except Unreachable as exc:
            progress.clear()
            print(exc, file=sys.stderr)
            return EXIT_UNREACHABLE
        try:
            batch.run(sock)
        except (ConnectionError, OSError) as exc:
            batch.abandon(str(exc))
        finally:
            sock.close()
    progress.close()
    if len(opts.items) > 1 or set(batch.results) - {'0'}:
        summary(batch.results, sys.stderr)
    return 0 if set(batch.results) <= {'0'} else EXIT_FAILED


def print_answer(body, name, fmt, several):
    """One file's answer as JSON (a line each) or as SRT/WebVTT (headed by its name when
    several files were sent, so one file's subtitle can be redirected as it is)."""
    if fmt == 'json':
        print(json.dumps(dict(body, file=name), ensure_ascii=False))
        return
    import _segments
    if several:
        print('==> %s <==' % name)
    print(_segments.RENDER[fmt](body.get('segments') or [], stereo=len(body.get('channels') or ()) > 1), end='')


def cmd_monitor(cfg, kind):
    try:
        answers = client_exchange(cfg, [(Type.MONITOR, {'type': kind})], 1, 10)
    except Unreachable as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as exc:
        print('svcmgr: the daemon did not answer: %s' % exc, file=sys.stderr)
        return 1
    if not answers:
        return 1
    print(json.dumps(answers[0][1], indent=2, ensure_ascii=False))
    return 0
