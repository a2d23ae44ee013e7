"""The drop-folder scanner: a process that takes settled audio files from
audio_source_path, claims each with an atomic rename into a `.processing` folder
beside it, submits it to the master and moves it out once its task is recorded.
The master's end of it is _scanner_link.ScannerLink.

Exactly once: a claimed file is named `<speechID>__<name>`, so a restart submits it
again under the same speechID; the master tells the scanner a task ended only after
the reporter has written its record, and at start the scanner looks up the records
of what it finds in `.processing`, so a recorded task is never run a second time.
"""
import collections
import datetime
import errno
import fnmatch
import json
import logging
import os
import re
import select
import time
from dataclasses import dataclass

import _children
import _config
import _packet
import _records
import _safepath
import _watch
from _link import encode_line, take_lines
from _states import LinkMsg, Result, Source

log = logging.getLogger('scanner')

PROCESSING = '.processing'
CLAIMED_RE = re.compile(r'(\d{8}_\d{6}_\d{6})__(.+)\Z', re.S)
SPEECH_ID_RE = re.compile(r'\d{8}_\d{6}_\d{6}')
# Results after which a rejected file stays claimed and is submitted again later.
RETRY_RESULTS = (Result.UNAVAILABLE.value, Result.TOO_MANY.value)
RETRY_SECS = 1.0
STATUS_SECS = 0.5
# The scanner never has more than this many tasks outstanding per worker (or engine
# recognition slot, if more): admission starts a task's session deadline, so scanned
# files waiting in a deep queue would time out.
TASKS_PER_WORKER = 2
REASON_MAX = 2000
RAW_PATH = 'filePathRaw'    # link only: the real filePath of a scanned file when it is not UTF-8
SCANNER_NICE = 5


# ---------------------------------------------------------------- walking and settling

class Walker:
    """One pass over the drop folder: the files that may be audio, and the `.processing` folders."""

    def __init__(self, root, skip_dirs=(), ignore=(), extensions=()):
        self.root = os.path.realpath(root)
        self.skip = {os.path.realpath(d) for d in skip_dirs}
        self.ignore = re.compile('|'.join(fnmatch.translate(p) for p in ignore)) if ignore else None
        self.extensions = {e.lower().lstrip('.') for e in extensions}

    def wanted(self, name):
        """True for a file name the scanner takes (not hidden, not ignored, an audio extension)."""
        if name.startswith('.') or (self.ignore is not None and self.ignore.match(name)):
            return False
        stem, dot, ext = name.rpartition('.')
        return bool(dot and stem) and ext.lower() in self.extensions

    def walk(self, top=None):
        """([(path, size, mtime_ns, inode)], [.processing folder]) under the root (or `top`).

        Symbolic links are not followed (a link to a folder could loop, a link to a
        file would be moved instead of the file), nor are the working folders entered.
        """
        files, processing = [], []
        stack = [top or self.root]
        while stack:
            folder = stack.pop()
            try:
                # Walked from the root without following links: a folder swapped for a
                # link since the previous listing is not entered.
                d = _safepath.open_dir(folder, [self.root])
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning('scanner: cannot list %s: %s', _safepath.text(folder), exc)
                continue
            with d, d.scandir() as it:
                for entry in it:
                    name = entry.name
                    path = os.path.join(folder, name)
                    try:
                        if name.startswith('.'):
                            if name == PROCESSING and entry.is_dir(follow_symlinks=False):
                                processing.append(path)
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            if path not in self.skip:
                                stack.append(path)
                            continue
                        if not entry.is_file(follow_symlinks=False) or not self.wanted(name):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue        # gone between the listing and the look
                    files.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
        return files, processing


class Settler:
    """Which files kept their size, mtime and inode since the previous pass (1.0's rule:
    unchanged for one scan interval). Empty files never settle."""

    def __init__(self):
        self.previous = {}

    def update(self, files):
        """Return (settled paths, oldest first; waiting count; empty count) for one pass."""
        previous, current, settled, empty = self.previous, {}, [], 0
        for path, size, mtime, inode in files:
            sig = (size, mtime, inode)
            current[path] = sig
            if not size:
                empty += 1
            elif previous.get(path) == sig:
                settled.append((mtime, path))
        self.previous = current
        settled.sort()
        return [path for _, path in settled], len(files) - len(settled) - empty, empty

    def forget(self, path):
        self.previous.pop(path, None)


def recorded_outcomes(folder, speech_ids):
    """{speechID: (result, state, message)} of the scanner's records among `speech_ids`.

    Only day files from the earliest claim on (a day early, for a changed time zone) are read.
    """
    wanted = set(speech_ids)
    found = {}
    if not wanted:
        return found
    first = (datetime.datetime.strptime(min(wanted)[:8], '%Y%m%d') - datetime.timedelta(days=1)).strftime('%Y%m%d')
    try:
        names = sorted(n for n in os.listdir(folder) if re.fullmatch(r'\d{8}\.json', n) and n[:8] >= first)
    except FileNotFoundError:
        return found
    for name in names:
        try:
            with open(os.path.join(folder, name), encoding='utf-8', errors='replace') as f:
                for line in f:
                    if not wanted.intersection(SPEECH_ID_RE.findall(line)):
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        # A line cut short (by a crash or a full disk) with, before 2.1, the next
                        # record glued to it: that record still counts; the cut part never did.
                        rec = _glued_record(line)
                        if rec is None:
                            continue
                    data = rec.get('data') if isinstance(rec, dict) else None
                    sid = data.get('speechID') if isinstance(data, dict) else None
                    if sid in wanted and rec.get('source') == Source.SCANNER.value and sid not in found:
                        found[sid] = (str(data.get('result')), str(rec.get('state')), str(rec.get('message') or ''))
        except OSError as exc:
            log.error('scanner: cannot read records %s: %s', name, exc)
    return found


def plausible(sid, now, slack=datetime.timedelta(days=1)):
    """True for a speechID that a clock of ours could have made: a real time from 2000 on,
    not more than `slack` ahead of `now`."""
    try:
        when = datetime.datetime.strptime(sid, '%Y%m%d_%H%M%S_%f')
    except ValueError:
        return False
    return datetime.datetime(2000, 1, 1) <= when <= now + slack


def _glued_record(line):
    start = line.rfind('{"data": ', 1)
    if start < 0:
        return None
    try:
        return json.loads(line[start:])
    except ValueError:
        return None


# ---------------------------------------------------------------- the scanner process

@dataclass(eq=False)
class Item:
    """A claimed file: `<folder>/<speechID>__<name>`, folder being a `.processing`."""
    sid: str
    folder: str
    name: str
    done: bool = False
    adopted: bool = False     # cluster mode: found claimed in the shared folder, maybe by another node

    @property
    def claimed(self):
        return '%s__%s' % (self.sid, self.name)

    @property
    def path(self):
        return os.path.join(self.folder, self.claimed)


def to_adopt(found, held, older_than):
    """Cluster mode: the claimed files found in the shared drop folder that this scanner does not
    hold and that were claimed more than `older_than` seconds ago (by a dead node, or an earlier
    life of this one). Submitted, the master answers from the cluster's row: recorded already
    (moved out), queued by a dead node or never entered (run), in progress elsewhere (refused:
    looked at again at the next adoption pass)."""
    cutoff = time.time() - older_than
    out = []
    for item in found:
        try:
            if item.sid in held or os.lstat(item.path).st_ctime > cutoff:
                continue        # ours, or claimed a moment ago, most likely by a live node
        except OSError:
            continue
        item.adopted = True
        out.append(item)
    if out:
        log.info('scanner: %d claimed file(s) in the shared folder submitted for adoption', len(out))
    return out


def utf8_name(name):
    """A file name that can be written into JSON records: bytes that are not UTF-8 become U+FFFD."""
    return _safepath.text(name)


class Scanner:
    """The scanner process: a loop of passes every scan_interval_secs and messages from the master."""

    def __init__(self, sock, cfg, master_pid, close_fds=()):
        self.sock = sock
        self.cfg = cfg
        self.master_pid = master_pid
        self.close_fds = close_fds
        d, t = cfg['directory'], cfg['task']
        self.root = os.path.realpath(d['audio_source_path'])
        self.interval = float(d['scan_interval_secs'])
        self.error_root = t['error_backup_path']
        self.done_root = d['scan_done_path']
        self.source_after = t['source_after']
        self.domain = (d['domain_code'], d['domain_name'])
        self.domain_from_folder = bool(d['domain_from_folder'])
        self.records = _config.records_dir(cfg)
        self.walker = Walker(self.root, [d['audio_target_path'], self.error_root, self.done_root],
                             d['scan_ignore'], d['scan_extensions'])
        self.settler = Settler()
        # inotify (scan_watch = auto) lets a file closed after writing go after scan_settle_secs.
        self.watch_mode = d['scan_watch']
        self.quick = _watch.QuickSettler(float(d['scan_settle_secs']), self.walker.wanted)
        self.watcher = None
        self.next_pass = 0.0
        e = cfg['engine']
        parallel = max(int(cfg['setting']['worker_processes']), int(e['engine_slots']) * int(e['engine_concurrency']))
        self.limit = min(int(cfg['setting']['max_tasks']), TASKS_PER_WORKER * parallel)
        self.items = {}                         # speechID -> Item: claimed, not yet moved out
        self.queue = collections.deque()        # Items claimed and not yet submitted, recovered ones first
        self.outstanding = set()                # speechIDs submitted whose end has not come
        self.unfinished = []                    # (Item, result, state, message) whose move out failed
        self.stuck = {}                         # path -> signature of a file that could not be claimed
        self.engine = False                     # until the master says an engine is there
        self.hold_until = 0.0
        self.first_pass = True
        # Cluster mode: claims in the shared folder older than node_dead_secs are adopted (to_adopt).
        c = cfg['cluster']
        self.adopt_secs, self.next_adopt = c['enabled'] and float(c['node_dead_secs']), 0.0
        self.stopping = False
        self.reopen = False
        self.rbuf = bytearray()
        self.counts = collections.Counter(dict.fromkeys(('scans', 'claimedTotal', 'quickClaims', 'recovered', 'done', 'failed'), 0))
        self.last = {}
        self.reported = (0.0, None)

    # ------------------------------------------------------------ process

    def run(self):
        # A pass over a large drop is background work: the master's loop and the workers go first.
        if not _children.become_child(self, self.cfg, 'svcmgr: scanner', 'scanner', self.master_pid,
                                      self.close_fds, keep=(self.sock.fileno(),), nice=SCANNER_NICE):
            return
        self.sock.setblocking(True)
        if self.watch_mode == 'auto':
            watcher = _watch.Watcher(self.root, self.walker.skip)
            self.watcher = watcher if watcher.start() else None
        log.info('scanner: watching %s every %g s%s (pid %d)', self.root, self.interval,
                 ', inotify: files closed after writing go after %g s' % self.quick.settle if self.watcher else
                 ' (polling only)', os.getpid())
        self.loop()
        if self.watcher is not None:
            self.watcher.close()
        log.info('scanner: stopped')

    def loop(self):
        self.next_pass = time.monotonic()
        while not self.stopping:
            try:
                if os.getppid() != self.master_pid:
                    log.warning('scanner: master is gone, exiting')
                    return
                if self.reopen:
                    self.reopen = False
                    _config.reopen_logs()
                if time.monotonic() >= self.next_pass:
                    started = time.monotonic()
                    self.scan()
                    # Pass starts stay at least one interval apart: that is what "settled" counts on.
                    self.next_pass = max(started + self.interval, time.monotonic())
                self.quick_claims()
                self.submit()
                self.report()
                self.receive(self.wait_time())
            except (BrokenPipeError, ConnectionError):
                log.warning('scanner: connection to the master lost, exiting')
                return
            except Exception:  # the loop's one catch-all: a bad pass must not end the scanner
                log.error('scanner: error in the scan loop', exc_info=True)
                time.sleep(min(self.interval, 1.0))

    # ------------------------------------------------------------ messages

    def send(self, *msg):
        self.sock.sendall(encode_line(*msg))

    def wait_time(self):
        now = time.monotonic()
        wait = min(max(0.0, self.next_pass - now), 1.0)
        if self.queue and self.engine and self.hold_until > now:
            wait = min(wait, self.hold_until - now)
        due = self.quick.next_due() if self.engine else None
        if due is not None:
            wait = min(wait, max(0.0, due - now))
        return wait

    def receive(self, timeout):
        watched = [self.watcher] if self.watcher is not None else []
        ready, _, _ = select.select([self.sock] + watched, [], [], timeout)
        if watched and self.watcher in ready:
            self.on_events(self.watcher.read())
        if self.sock not in ready:
            return
        data = self.sock.recv(1 << 16)
        if not data:
            log.info('scanner: the master closed the connection, exiting')
            self.stopping = True
            return
        self.rbuf += data
        for line in take_lines(self.rbuf):
            try:
                msg = json.loads(line)
            except ValueError:
                log.error('scanner: unreadable message from the master: %r', line[:200])
                continue
            self.handle(msg)

    def handle(self, msg):
        try:
            kind = LinkMsg(msg[0])
        except (ValueError, IndexError, TypeError):
            log.warning('scanner: unknown message %r from the master', msg[:1])
            return
        if kind == LinkMsg.ENDED:
            _, sid, result, state, message = msg
            self.outstanding.discard(sid)
            item = self.items.get(sid)
            if item is None:
                log.debug('scanner: speechID=%s ended but is not ours (already moved out)', sid)
                return
            self.finish(item, result, state, message)
        elif kind == LinkMsg.REJECTED:
            _, sid, result, message = msg
            self.outstanding.discard(sid)
            item = self.items.get(sid)
            if item is None:
                return
            if item.adopted and result in RETRY_RESULTS + (Result.ALREADY_CONNECTED.value,):
                # In progress on another node: its claimer moves it out; looked at again later.
                del self.items[sid]
            elif result in RETRY_RESULTS:
                # Busy or no engine: the file stays claimed and goes again shortly.
                log.debug('scanner: speechID=%s not admitted now (%s: %s)', sid, result, message)
                self.queue.appendleft(item)
                self.hold_until = time.monotonic() + min(RETRY_SECS, self.interval)
            elif result == Result.ALREADY_CONNECTED.value:
                # A client task holds this speechID: the file takes a new one.
                if self.reclaim(item):
                    self.queue.appendleft(item)
            else:
                log.warning('scanner: speechID=%s %s refused with %s: %s', sid, item.name, result, message)
                self.finish(item, result, 'NONE', message)
        elif kind == LinkMsg.ENGINE:
            self.engine = bool(msg[1])
            log.info('scanner: %s', 'the master takes tasks again' if self.engine else
                     'the master takes no tasks now (no engine, or usage records cannot be written): paused')
        elif kind == LinkMsg.STOP:
            self.stopping = True
        else:
            log.warning('scanner: unknown message %r from the master', kind)

    def on_events(self, events):
        for kind, path in events:
            if kind == _watch.OVERFLOW:
                log.warning('scanner: inotify dropped events; a full pass now')
                self.next_pass = time.monotonic()
            elif kind == _watch.NEWDIR:
                # Files written before the folder was watched raised no event here.
                for found, _size, _mtime, _inode in self.walker.walk(path)[0]:
                    self.quick.note(_watch.WRITTEN, found)
            else:
                self.quick.note(kind, path)

    def quick_claims(self):
        if not self.engine or self.quick.next_due() is None:
            return
        claimed = sum(self.claim(path) for path in self.quick.ready())
        if claimed:
            log.info('scanner: %d file(s) claimed as soon as written (inotify)', claimed)
            self.counts['quickClaims'] += claimed

    def submit(self):
        if not self.engine or time.monotonic() < self.hold_until:
            return
        while self.queue and len(self.outstanding) < self.limit:
            item = self.queue.popleft()
            if item.done:
                continue
            self.outstanding.add(item.sid)
            self.send(LinkMsg.SUBMIT, self.request(item))

    def request(self, item):
        code, name = self.domain
        rel = os.path.relpath(os.path.dirname(item.folder), self.root)
        if self.domain_from_folder and rel != '.':
            code = utf8_name(rel.split(os.sep)[0])
        req = {'speechID': item.sid, 'domainName': name, 'domainCode': code,
               'fileID': item.claimed, 'fileName': item.name, 'filePath': utf8_name(item.folder)}
        if req['filePath'] != item.folder:
            # A folder name that is not UTF-8: the request (and so the record) shows it with
            # U+FFFD, the master's job uses the real name, which the link carries escaped.
            req[RAW_PATH] = item.folder
        return req

    def report(self, force=False):
        """Send the status Monitor shows: after each pass, and at most every STATUS_SECS when it changed."""
        status = dict(self.last, state='running' if self.engine else 'paused', claimed=len(self.queue),
                      watch='inotify' if self.watcher is not None else 'poll', settling=len(self.quick.due),
                      inProgress=len(self.outstanding), **self.counts)
        at, before = self.reported
        now = time.monotonic()
        if force or (status != before and now - at >= STATUS_SECS):
            self.send(LinkMsg.STATUS, status)
            self.reported = (now, status)

    # ------------------------------------------------------------ passes

    def scan(self):
        cpu, wall = time.process_time(), time.perf_counter()
        files, processing = self.walker.walk()
        settled, waiting, empty = self.settler.update(files)
        scan_cpu, scan_wall = time.process_time() - cpu, time.perf_counter() - wall
        if self.first_pass:
            self.first_pass = False
            if not self.adopt_secs:
                self.recover(processing)
        if self.adopt_secs and time.monotonic() >= self.next_adopt:
            self.next_adopt = time.monotonic() + self.adopt_secs
            for item in to_adopt(self.find_claimed(processing), self.items, self.adopt_secs):
                self.items[item.sid] = item
                self.queue.appendleft(item)
                self.counts['adopted'] += 1
        claimed = 0
        if self.engine:
            for path in settled:
                claimed += self.claim(path)
        if self.unfinished:
            retry, self.unfinished = self.unfinished, []
            for args in retry:
                self.finish(*args)
        self.counts['scans'] += 1
        self.last = {'lastScan': _records.stamp(), 'scanSecs': round(scan_wall, 4), 'scanCpuSecs': round(scan_cpu, 4),
                     'filesSeen': len(files), 'waiting': waiting, 'empty': empty}
        level = logging.INFO if claimed else logging.DEBUG
        log.log(level, 'scanner: pass over %d file(s) in %.3f s (cpu %.3f s): %d claimed, %d waiting, %d empty',
                len(files), scan_wall, scan_cpu, claimed, waiting, empty)
        self.report(force=True)

    def open(self, folder, create=False):
        """A folder below the drop folder, walked from it without following links."""
        return _safepath.open_dir(folder, [self.root], create)

    def claim(self, path):
        """Rename a settled file into the .processing folder beside it under a new speechID.

        Both folders are descriptors reached from the drop folder without following links:
        a folder or a `.processing` that is a link makes the claim fail, never leave the root.
        """
        folder, name = os.path.split(path)
        item = Item(_packet.new_speech_id(), os.path.join(folder, PROCESSING), utf8_name(name))
        try:
            with self.open(folder) as d, d.sub(PROCESSING, create=True) as proc:
                d.rename(name, proc, item.claimed)
        except FileNotFoundError:
            self.settler.forget(path)    # taken away meanwhile
            return 0
        except OSError as exc:
            return self._cannot_claim(path, exc)
        self.settler.forget(path)
        self.quick.forget(path)
        self.stuck.pop(path, None)
        self.items[item.sid] = item
        self.queue.append(item)
        self.counts['claimedTotal'] += 1
        log.debug('scanner: claimed %s as speechID=%s', utf8_name(path), item.sid)
        return 1

    def _cannot_claim(self, path, exc):
        sig = self.settler.previous.get(path)
        if self.stuck.get(path) != sig:
            # Once per version of the file, not at every pass.
            log.error('scanner: cannot claim %s: %s', utf8_name(path), exc)
            self.stuck[path] = sig
        return 0

    def reclaim(self, item):
        old = item.path
        sid = _packet.new_speech_id()
        try:
            with self.open(item.folder) as d:
                d.rename(item.claimed, d, '%s__%s' % (sid, item.name))
        except OSError as exc:
            log.error('scanner: cannot rename %s to a new speechID: %s', utf8_name(old), exc)
            self.unfinished.append((item, Result.ERROR.value, 'ERROR', 'cannot take a new speechID: %s' % exc))
            return False
        log.warning('scanner: speechID=%s is used by another task; %s continues as speechID=%s',
                    item.sid, item.name, sid)
        if self.items.get(item.sid) is item:
            del self.items[item.sid]
        item.sid = sid
        self.items[sid] = item
        return True

    def recover(self, folders):
        """At start: what a previous run left claimed is finished from its record, or submitted first."""
        found = self.find_claimed(folders)
        if not found:
            return
        # A speechID our clock cannot have made (planted, or a broken clock: far in the
        # future, before 2000, no date at all) must not move the clock: such a file
        # takes a new speechID instead.
        now = datetime.datetime.now()
        planted = [item for item in found if not plausible(item.sid, now)]
        found = sorted((item for item in found if item not in planted), key=lambda item: item.sid)
        if found:
            # New speechIDs must never repeat one of these, even after the clock stepped back.
            _packet.new_speech_id(datetime.datetime.strptime(found[-1].sid, '%Y%m%d_%H%M%S_%f'))
        outcomes = recorded_outcomes(self.records, [item.sid for item in found])
        resumed = 0
        for item in found + planted:
            if item in planted:
                log.warning('scanner: %s has a speechID no clock of ours made; it takes a new one',
                            utf8_name(item.path))
            if (item in planted or item.sid in self.items) and not self.reclaim(item):
                continue
            self.items[item.sid] = item
            outcome = outcomes.get(item.sid)
            if outcome is not None:
                log.info('scanner: speechID=%s %s was already recorded (%s); moving it out, not running it again',
                         item.sid, item.name, outcome[0])
                self.finish(item, *outcome)
            else:
                self.queue.append(item)
                resumed += 1
        total = len(found) + len(planted)
        self.counts['recovered'] += total
        log.info('scanner: found %d claimed file(s) from before: %d submitted again, %d already recorded',
                 total, resumed, total - resumed)

    def find_claimed(self, folders):
        found = []
        for folder in folders:
            try:
                with self.open(folder) as d, d.scandir() as it:
                    for entry in it:
                        match = CLAIMED_RE.match(entry.name)
                        if match and entry.is_file(follow_symlinks=False):
                            found.append(Item(match.group(1), folder, match.group(2)))
                        elif not entry.name.startswith('.'):
                            log.warning('scanner: %s is not a claimed file; left alone',
                                        utf8_name(os.path.join(folder, entry.name)))
            except OSError as exc:
                log.error('scanner: cannot list %s: %s', utf8_name(folder), exc)
        return found

    # ------------------------------------------------------------ moving out

    def finish(self, item, result, state, message):
        """Move a claimed file out once its task is recorded: deleted or kept (scan_done_path)
        on success, into error_backup_path with `<name>.reason` on failure."""
        ok = result == Result.OK.value
        try:
            if ok and self.source_after == 'delete':
                with self.open(item.folder) as d:
                    if d.stat(item.claimed) is None:
                        raise FileNotFoundError(errno.ENOENT, 'not found', item.path)
                    d.unlink(item.claimed)
                where = 'deleted'
            elif ok:
                where = move_aside(self.root, item, self.done_root)
            else:
                reason = '%s\nspeechID=%s result=%s state=%s\n' % (message or 'failed', item.sid, result, state)
                where = move_aside(self.root, item, self.error_root, reason[:REASON_MAX])
        except FileNotFoundError:
            where = 'already gone'
            log.warning('scanner: speechID=%s %s was no longer in %s', item.sid, item.name, utf8_name(item.folder))
        except OSError as exc:
            log.error('scanner: speechID=%s: cannot move %s out (%s); trying again at the next pass',
                      item.sid, utf8_name(item.path), exc)
            self.unfinished.append((item, result, state, message))
            return
        item.done = True
        self.items.pop(item.sid, None)
        self.counts['done' if ok else 'failed'] += 1
        log.info('scanner: speechID=%s %s %s: %s', item.sid, item.name, 'done' if ok else 'failed (%s)' % result, where)
        try:
            with self.open(os.path.dirname(item.folder)) as parent:
                parent.rmdir(PROCESSING)        # an empty .processing is not left behind
        except OSError:
            pass



def move_aside(drop_root, item, root, reason=None):
    """Move a claimed file below `root` (error_backup_path or scan_done_path, configured,
    so trusted) into its subfolder there; every folder below `root` is walked, not followed."""
    rel = os.path.relpath(os.path.dirname(item.folder), drop_root)
    os.makedirs(root, exist_ok=True)
    folder = root if rel == '.' else os.path.join(root, rel)
    with _safepath.open_dir(item.folder, [drop_root]) as src, _safepath.open_dir(folder, [root], create=True) as dest:
        st = src.stat(item.claimed)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, 'not found', item.path)
        name = item.name
        if dest.stat(name) is not None:
            name = '%s_%s' % (item.sid, item.name)
        if reason is not None:
            # The reason first: a crash before the move leaves the file claimed, to be moved at the next start.
            fd, tmp = dest.create_temp(name + '.reason')
            with os.fdopen(fd, 'w', encoding='utf-8', errors='replace') as f:
                f.write(reason)
            dest.replace(tmp, name + '.reason')
        src.move(item.claimed, dest, name, expect=st)
    return utf8_name(os.path.join(folder, name))

def main(sock, cfg, master_pid, close_fds=()):
    """Entry point of the scanner process (multiprocessing target)."""
    Scanner(sock, cfg, master_pid, close_fds).run()
