"""The webhook outbox: every finished task is written durably to records/webhook/<speechID>
first, then POSTed by a small pool of sender threads (never the master's loop), signed after
the Standard Webhooks convention, retried with backoff, parked in failed/ when given up.

Also the `svcmgr.py webhook list|redeliver` commands, which work on the files alone.
"""
import base64
import binascii
import email.utils
import errno
import hashlib
import heapq
import hmac
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass

import requests
import urllib3

from _packet import SPEECH_ID_RE
import _jsonstrict
from _records import FINAL, Unwritten, stamp, write_synced

log = logging.getLogger('webhook')

FORMAT = 'svcmgr-webhook/1'
FAILED = 'failed'
TMP_PREFIX = '.tmp.'
# An entry is named after its speechID, as in 1.0; a second entry for the same speechID
# (the first not yet delivered) or a speechID that is a folder name here (failed) gets
# '~N' appended, which no speechID can contain, so names never clash.
NAME_RE = re.compile(r'[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}(~[0-9]{1,6})?\Z')
MAX_SUFFIX = 999999
# Left by a writer that died between writing and renaming; younger ones may be in use.
STALE_TMP_SECS = 3600
ERROR_BODY_BYTES = 200
CONTENT_TYPE = 'application/json; charset=utf-8'


class EntryError(Exception):
    """An outbox file that is not an entry this version can send."""


# ---------------------------------------------------------------- settings

@dataclass
class Settings:
    url: str
    key: bytes = None             # HMAC key; None = unsigned
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    concurrency: int = 4
    backoff_base: float = 5.0
    backoff_max: float = 3600.0
    give_up_after: float = 259200.0
    max_attempts: int = 0         # 0 = only give_up_after limits the retries
    rescan: float = 5.0
    user_agent: str = 'svcmgr'

    @classmethod
    def from_cfg(cls, cfg):
        w = cfg['webhook']
        return cls(url=w['url'], key=signing_key(w['secret']),
                   connect_timeout=float(w['connect_timeout_secs']), read_timeout=float(w['read_timeout_secs']),
                   concurrency=int(w['concurrency']), backoff_base=float(w['backoff_base_secs']),
                   backoff_max=float(w['backoff_max_secs']), give_up_after=float(w['give_up_after_secs']),
                   max_attempts=int(w['max_attempts']), rescan=float(w['rescan_secs']),
                   user_agent='svcmgr/%s' % cfg['setting']['version'])


def signing_key(secret):
    """The HMAC key of a secret: Standard Webhooks' 'whsec_<base64>' form is decoded, as its
    libraries do; any other text is used as its UTF-8 bytes. Empty = no signature."""
    if not secret:
        return None
    if secret.startswith('whsec_'):
        try:
            return base64.b64decode(secret[len('whsec_'):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError('a whsec_ secret must be base64 after the prefix') from None
    return secret.encode('utf-8')


def outbox_dir(cfg):
    """records/webhook beside app.ini; in cluster mode with a shared_path, the node's records
    folder there, so that a live node can adopt what a dead one never delivered."""
    import _config
    return os.path.join(_config.records_dir(cfg), 'webhook')


def entry_id(payload):
    """The webhook-id of a finished task: a function of the task's record (speechID, start and
    end), so that the same task sent by two nodes (its dead runner's outbox adopted, and the
    taker that answered from its record) carries one id for the receiver to dedupe on."""
    key = '%s|%s|%s' % (payload.get('speechID'), payload.get('startTime'), payload.get('endTime'))
    return 'msg_' + hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]


def adopt_outbox(dead_dir, own_dir):
    """Move the entries of a dead node's outbox into ours (link, then unlink: a name taken in
    ours gets the next ~N); the senders find them at their next rescan. Returns how many."""
    try:
        with os.scandir(dead_dir) as it:
            names = [e.name for e in it if NAME_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    moved = 0
    os.makedirs(own_dir, exist_ok=True)
    for name in names:
        src = os.path.join(dead_dir, name)
        for n in range(MAX_SUFFIX + 1):
            dst = os.path.join(own_dir, name if n == 0 else '%s~%d' % (name.split('~')[0], n))
            try:
                os.link(src, dst)
            except FileExistsError:
                continue
            except FileNotFoundError:
                break           # another node took it first
            _unlink(src)
            moved += 1
            break
    if moved:
        _fsync_dir(own_dir)
    return moved


# ---------------------------------------------------------------- payload

def build_payload(record):
    """The JSON body of a finished task, from its TaskRecord.

    Top level follows the protocol: `result` is the result code string ("0"), as in
    2002 and in the records. The 1.0 design's row fields are there too, under their
    1.0 names: the task-level ones (sttKey, key, filename, seq, regDate, regTime,
    callTime) at the top, and one row per utterance in `segments` (webhook_segments),
    where `result` is its text as 1.0 named it.
    """
    req = record.request or {}
    sid = record.speech_id
    duration = record.duration
    start_time = stamp(record.created)
    reg_date, reg_time = _reg_date_time(start_time)
    channels = record.channels or []
    row = {'sttKey': sid, 'key': req.get('fileID'), 'filename': req.get('fileName'),
           'seq': record.seq, 'regDate': reg_date, 'regTime': reg_time, 'callTime': duration}
    payload = {
        'speechID': sid,
        'result': record.result.value,
        'state': record.state.value,
    }
    if record.message:
        payload['message'] = record.message
    payload.update({
        'transcript': record.transcript,
        'channels': channels,
        'duration': duration,
        'domainName': req.get('domainName'),
        'domainCode': req.get('domainCode'),
        'fileID': req.get('fileID'),
        'fileName': req.get('fileName'),
        'filePath': req.get('filePath'),
        'audioPath': req.get('audioPath') or record.audio_path,
        'audioWAV': record.audio_wav,
        'audioMP3': record.audio_mp3,
        'source': record.source.value,
        'startTime': start_time,
        'endTime': stamp(record.ended),
        'processInterval': record.to_line()['processInterval'],
    })
    payload.update(row)
    payload['confidence'] = record.confidence
    payload['segments'] = webhook_segments(record, row, channels, duration)
    # Unknown request fields are forwarded (PROTOCOL.md); svcmgr's own keys win a clash.
    for key, value in req.items():
        payload.setdefault(key, value)
    return payload


def webhook_segments(record, row, channels, duration):
    """1.0's `segments` rows: one per utterance with its real times, `result` its text as 1.0
    named it (also as `text`), plus segmentSeq, confidence, lowConfidence and words. A task
    without segments (a legacy engine that sends none) keeps 1.0's one row per channel
    spanning the whole call."""
    if record.segments is not None:
        return [dict(row, segmentSeq=seg['seq'], channel=seg['channel'], start=seg['start'], end=seg['end'],
                     result=seg['text'], text=seg['text'], confidence=seg.get('confidence'),
                     lowConfidence=seg.get('lowConfidence', False), words=seg.get('words') or [])
                for seg in record.segments]
    return [dict(row, channel=ch.get('channel'), start=0.0 if duration is not None else None,
                 end=duration, result=ch.get('transcript', '')) for ch in channels]


def _reg_date_time(start_time):
    """('YYYYMMDD', 'HHMMSS') of a 'YYYY.MM.DD HH:MM:SS.ffffff' stamp (the task's creation)."""
    if not isinstance(start_time, str) or len(start_time) < 19:
        return None, None
    return start_time[:10].replace('.', ''), start_time[11:19].replace(':', '')


def encode_body(payload):
    # Strict JSON: a receiver that refuses NaN would answer 400 to every retry.
    return _jsonstrict.dumps(payload, ensure_ascii=False, separators=(',', ':')).encode('utf-8')


def sign(key, msg_id, timestamp, body):
    """Standard Webhooks' signature: v1,<base64 HMAC-SHA256 of 'id.timestamp.body'>."""
    mac = hmac.new(key, b'%s.%s.%s' % (msg_id.encode(), str(timestamp).encode(), body), hashlib.sha256)
    return 'v1,' + base64.b64encode(mac.digest()).decode('ascii')


def parse_retry_after(value, now=None):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff(settings, attempts, rand=random.random):
    """Delay before the next try after `attempts` failures: exponential, capped, with jitter
    (half to all of the step) so entries that failed together do not retry together."""
    step = min(settings.backoff_max, settings.backoff_base * 2 ** min(attempts - 1, 60))
    return step * (0.5 + 0.5 * rand())


# ---------------------------------------------------------------- outbox files

class Outbox:
    """The entries on disk: one JSON file each, written atomically (temp, fsync, rename)."""

    def __init__(self, folder):
        self.folder = os.path.abspath(folder)
        self.failed_dir = os.path.join(self.folder, FAILED)

    def ensure(self):
        os.makedirs(self.failed_dir, exist_ok=True)

    def _dir(self, failed):
        return self.failed_dir if failed else self.folder

    def path(self, name, failed=False):
        """The file of an entry; refuses any name that could leave the outbox."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError('not a valid outbox entry name: %r' % (name,))
        folder = self._dir(failed)
        path = os.path.join(folder, name)
        # Defence in depth: the name check already excludes separators and '..'.
        if os.path.dirname(os.path.normpath(path)) != folder:
            raise ValueError('entry name %r resolves outside %s' % (name, folder))
        return path

    def new_entry(self, speech_id, payload, now=None, msg_id=None):
        if not isinstance(speech_id, str) or not SPEECH_ID_RE.fullmatch(speech_id):
            raise ValueError('refusing webhook entry for invalid speechID %r' % (speech_id,))
        now = time.time() if now is None else now
        return {'format': FORMAT, 'id': msg_id or 'msg_' + uuid.uuid4().hex, 'speechID': speech_id,
                'created': now, 'attempts': 0, 'next_at': now, 'last_attempt': None,
                'last_status': None, 'last_error': None, 'payload': payload}

    def add(self, entry, failed=False):
        """Write a new entry under its speechID (or speechID~N); return the name used."""
        self.ensure()
        data = _dumps_entry(entry)
        sid = entry['speechID']
        for n in range(MAX_SUFFIX + 1):
            name = sid if n == 0 else '%s~%d' % (sid, n)
            path = self.path(name, failed)
            if os.path.lexists(path):
                continue
            if self._write(path, data, exclusive=True):
                return name
        raise OSError('no free outbox name for speechID %s' % sid)

    def save(self, name, entry, failed=False):
        """Replace an existing entry (after an attempt)."""
        self._write(self.path(name, failed), _dumps_entry(entry), exclusive=False)

    def _write(self, path, data, exclusive):
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, '%s%s.%d.%d' % (TMP_PREFIX, os.path.basename(path), os.getpid(),
                                                   threading.get_ident()))
        try:
            write_synced(tmp, data, os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
        except OSError:
            _unlink(tmp)        # a part written on a full disk holds space the retry needs
            raise
        try:
            if exclusive:
                # link() never replaces: an entry another writer made meanwhile stays intact.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as exc:
                    # A filesystem without hard links: check, then rename (one writer of
                    # new names, the reporter, makes the gap harmless).
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    if os.path.lexists(path):
                        return False
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            if exclusive:
                _unlink(tmp)
        _fsync_dir(folder)
        return True

    def read(self, name, failed=False, adopt=True):
        """The entry, or None when it is gone; EntryError when it is not an entry.
        A 1.0 leftover (the bare payload) is wrapped into an entry, and saved that way
        when `adopt` (so its webhook-id is fixed from then on)."""
        path = self.path(name, failed)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EntryError('cannot open %s: %s' % (path, exc.strerror or exc)) from None
        try:
            with os.fdopen(fd, 'rb') as f:
                raw = f.read()
        except OSError as exc:
            raise EntryError('cannot read %s: %s' % (path, exc.strerror or exc)) from None
        try:
            entry = json.loads(raw.decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as exc:
            raise EntryError('%s is not JSON: %s' % (path, exc)) from None
        if not isinstance(entry, dict):
            raise EntryError('%s is not a JSON object' % path)
        if entry.get('format') != FORMAT:
            sid = name.split('~')[0]
            created = os.stat(path).st_mtime
            entry = dict(self.new_entry(sid, entry, created), next_at=time.time())
            if not adopt:
                return dict(entry, id=None)
            self.save(name, entry, failed)
            log.info('webhook speechID=%s: 1.0 outbox file %s taken over as entry %s', sid, path, entry['id'])
        return entry

    def remove(self, name, failed=False):
        _unlink(self.path(name, failed))
        _fsync_dir(self._dir(failed))

    def give_up(self, name, entry):
        """Move an entry into failed/; return its name there."""
        entry = dict(entry, failed_at=time.time())
        failed_name = self.add(entry, failed=True)
        self.remove(name)
        return failed_name

    def quarantine(self, name):
        """Move an unreadable file into failed/ untouched, out of the senders' way."""
        self.ensure()
        dest = os.path.join(self.failed_dir, name)
        n = 0
        while os.path.lexists(dest):
            n += 1
            dest = os.path.join(self.failed_dir, '%s~%d' % (name.split('~')[0], n))
        os.rename(self.path(name), dest)
        return os.path.basename(dest)

    def redeliver(self, failed_name, now=None):
        """Move a failed entry back into the outbox with its attempts reset; its webhook-id stays."""
        entry = self.read(failed_name, failed=True)
        if entry is None:
            raise FileNotFoundError(failed_name)
        now = time.time() if now is None else now
        entry = dict(entry, attempts=0, next_at=now, redelivered=entry.get('redelivered', 0) + 1)
        entry.pop('failed_at', None)
        name = self.add(entry)
        self.remove(failed_name, failed=True)
        return name

    def names(self, failed=False):
        """Entry names in the outbox (or failed/), oldest first by file time."""
        return [name for name, _ in self.scan(failed)]

    def scan(self, failed=False):
        """[(name, mtime_ns)] of the entry files, oldest first; removes stale temp files."""
        found = []
        try:
            listing = list(os.scandir(self._dir(failed)))
        except FileNotFoundError:
            return []
        now = time.time()
        for de in listing:
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if de.name.startswith(TMP_PREFIX):
                if now - st.st_mtime > STALE_TMP_SECS:
                    _unlink(de.path)
                continue
            if not de.is_file(follow_symlinks=False) or not NAME_RE.fullmatch(de.name):
                continue
            found.append((de.name, st.st_mtime_ns))
        found.sort(key=lambda item: (item[1], item[0]))
        return found

    def mtime_ns(self, name):
        try:
            return os.stat(self.path(name), follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:
            return None


def _dumps_entry(entry):
    return (_jsonstrict.dumps(entry, ensure_ascii=False, indent=1) + '\n').encode('utf-8')


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder):
    # The rename is durable only once the folder itself is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- sender

class Sender:
    """A pool of threads that deliver due entries; the schedule lives in memory, the truth
    on disk: each attempt reads its entry and writes the outcome back before the next."""

    def __init__(self, outbox, settings):
        self.outbox = outbox
        self.settings = settings
        self.cond = threading.Condition()
        self.due = {}                 # name -> next_at (wall clock)
        self.heap = []                # (next_at, seq, name), stale items skipped
        self.seq = 0
        self.inflight = set()
        self.known = {}               # name -> mtime_ns of the file as we last saw it
        self.touched = {}             # name -> change counter when a sender last acted on it
        self.changes = 0
        self.next_scan = 0.0          # monotonic; 0 = the first thread drains the outbox at once
        self.scanning = False
        self.stopping = False
        self.threads = []
        self.delivered = 0
        self.failed = 0
        self.attempts = 0
        self.last_error = None
        self.last_delivery = None

    def start(self):
        self.outbox.ensure()
        for i in range(self.settings.concurrency):
            t = threading.Thread(target=self._run, name='webhook-%d' % (i + 1), daemon=True)
            t.start()
            self.threads.append(t)
        log.info('webhook: %d sender thread(s) for %s, outbox %s', len(self.threads),
                 _safe_url(self.settings.url), self.outbox.folder)

    def stop(self, timeout=5.0):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in self.threads if t.is_alive()]
        if busy:
            # Their entries stay on disk and go out at the next start, with the same webhook-id.
            log.warning('webhook: %s still delivering at stop; left to the next start', ', '.join(busy))

    def wake(self, name, next_at):
        """A new entry is on disk (the sink wrote it)."""
        with self.cond:
            self.changes += 1
            self.touched[name] = self.changes
            # A rescan may have found the file before this call and a sender taken it already.
            if name not in self.inflight:
                self._schedule(name, next_at)
                self.cond.notify()

    def _schedule(self, name, at):
        self.due[name] = at
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, name))

    def status(self):
        """The Monitor's outbox object; memory only, no disk access."""
        with self.cond:
            return {'enabled': True, 'pending': len(self.due) + len(self.inflight),
                    'inFlight': len(self.inflight), 'failed': self.failed, 'delivered': self.delivered,
                    'attempts': self.attempts, 'lastDelivery': self.last_delivery,
                    'lastError': dict(self.last_error) if self.last_error else None}

    # ------------------------------------------------------------ threads

    def _run(self):
        session = requests.Session()
        session.headers['User-Agent'] = self.settings.user_agent
        try:
            while True:
                name = self._next()
                if name is None:
                    return
                next_at = None
                try:
                    next_at = self._attempt(session, name)
                except Exception:  # the thread's one catch-all: one bad entry must not stop delivery
                    log.error('webhook: delivering entry %s failed unexpectedly', name, exc_info=True)
                    next_at = time.time() + self.settings.backoff_max
                finally:
                    # Release the claim and reschedule in one step, so no other sender can
                    # take the entry while this one still holds it.
                    with self.cond:
                        self.inflight.discard(name)
                        self.changes += 1
                        self.touched[name] = self.changes
                        if next_at is not None:
                            self._schedule(name, next_at)
                        self.cond.notify()
        finally:
            session.close()

    def _next(self):
        """Block until an entry is due and claim it; None when stopping."""
        with self.cond:
            while not self.stopping:
                if not self.scanning and time.monotonic() >= self.next_scan:
                    self._rescan()
                    continue
                while self.heap and self.due.get(self.heap[0][2]) != self.heap[0][0]:
                    heapq.heappop(self.heap)
                now = time.time()
                if self.heap and self.heap[0][0] <= now:
                    _, _, name = heapq.heappop(self.heap)
                    del self.due[name]
                    self.inflight.add(name)
                    return name
                wait = self.next_scan - time.monotonic() if not self.scanning else self.settings.rescan
                if self.heap:
                    wait = min(wait, self.heap[0][0] - now)
                self.cond.wait(max(0.005, wait))
            return None

    def _rescan(self):
        """Pick up entries the senders do not know (left by an earlier run, redelivered by the
        CLI) and forget those gone. Called with the lock held; the disk work runs without it."""
        self.scanning = True
        since = self.changes
        self.cond.release()
        try:
            found, failed = self._scan_disk()
        finally:
            self.cond.acquire()
        self.scanning = False
        self.next_scan = time.monotonic() + self.settings.rescan
        if found is None:
            return
        self.failed = failed
        on_disk = set()
        for name, mtime, next_at in found:
            on_disk.add(name)
            if name in self.inflight or self.touched.get(name, -1) > since:
                continue
            self.known[name] = mtime
            if next_at is not None:
                self._schedule(name, next_at)
        # Forget what left the disk (delivered, given up, removed by hand), unless a sender
        # acted on it while the listing was made.
        for name in set(self.due) | set(self.known) | set(self.touched):
            if name in on_disk or name in self.inflight or self.touched.get(name, -1) > since:
                continue
            self.due.pop(name, None)
            self.known.pop(name, None)
            self.touched.pop(name, None)
        self.cond.notify_all()

    def _scan_disk(self):
        """[(name, mtime_ns, next_at or None if unchanged)], failed count; None on error."""
        try:
            listing = self.outbox.scan()
            failed = len(self.outbox.scan(failed=True))
        except OSError as exc:
            log.error('webhook: cannot list the outbox %s: %s', self.outbox.folder, exc)
            return None, 0
        found = []
        for name, mtime in listing:
            with self.cond:
                unchanged = self.known.get(name) == mtime and (name in self.due or name in self.inflight)
            if unchanged:
                found.append((name, mtime, None))
                continue
            try:
                entry = self.outbox.read(name)
            except EntryError as exc:
                try:
                    moved = self.outbox.quarantine(name)
                except OSError as err:
                    log.error('webhook: %s; cannot move it aside: %s', exc, err)
                else:
                    log.error('webhook: %s; moved to failed/%s', exc, moved)
                    failed += 1
                continue
            if entry is None:
                continue
            found.append((name, self.outbox.mtime_ns(name) or mtime, float(entry.get('next_at') or 0)))
        return found, failed

    def _attempt(self, session, name):
        """One POST of an entry; returns when to try again, or None when it is done with."""
        entry = self.outbox.read(name)
        if entry is None:
            return None
        s = self.settings
        sid = entry.get('speechID')
        body = encode_body(entry['payload'])
        timestamp = int(time.time())
        headers = {'Content-Type': CONTENT_TYPE, 'webhook-id': entry['id'], 'webhook-timestamp': str(timestamp)}
        if s.key:
            headers['webhook-signature'] = sign(s.key, entry['id'], timestamp, body)
        attempt = entry.get('attempts', 0) + 1
        t0 = time.monotonic()
        status, error, retry_after = None, None, None
        try:
            resp = session.post(s.url, data=body, headers=headers, timeout=(s.connect_timeout, s.read_timeout),
                                allow_redirects=False, stream=True)
        except requests.Timeout as exc:
            error = 'timed out (connect %g s, read %g s): %s' % (s.connect_timeout, s.read_timeout, _short(exc))
        except requests.ConnectionError as exc:
            error = 'cannot connect: %s' % _short(exc)
        except requests.RequestException as exc:
            error = 'request failed: %s' % _short(exc)
        else:
            with resp:
                status = resp.status_code
                if not 200 <= status < 300:
                    retry_after = parse_retry_after(resp.headers.get('Retry-After'))
                    error = 'HTTP %d %s' % (status, resp.reason or '')
                    if 300 <= status < 400:
                        error += ' to %s (redirects are not followed)' % resp.headers.get('Location', '?')
                    text = _peek(resp)
                    if text:
                        error += ': ' + text
        ms = (time.monotonic() - t0) * 1000
        now = time.time()
        with self.cond:
            self.attempts += 1
        if error is None:
            self.outbox.remove(name)
            with self.cond:
                self.delivered += 1
                self.last_delivery = stamp(now)
                self.known.pop(name, None)
            log.info('webhook speechID=%s: delivered %s (attempt %d, HTTP %d, %.0f ms)',
                     sid, entry['id'], attempt, status, ms)
            return None
        entry.update(attempts=attempt, last_attempt=now, last_status=status, last_error=error)
        with self.cond:
            self.last_error = {'speechID': sid, 'error': error, 'time': stamp(now)}
        if status == 410:
            self._give_up(name, entry, 'the receiver asked to stop')
            return None
        if s.max_attempts and attempt >= s.max_attempts:
            self._give_up(name, entry, 'max_attempts (%d) reached' % s.max_attempts)
            return None
        if now - float(entry.get('created', now)) >= s.give_up_after:
            self._give_up(name, entry, 'give_up_after_secs (%g s) passed' % s.give_up_after)
            return None
        delay = min(retry_after, s.backoff_max) if retry_after is not None else backoff(s, attempt)
        entry['next_at'] = now + delay
        self.outbox.save(name, entry)
        mtime = self.outbox.mtime_ns(name)
        with self.cond:
            if mtime is not None:
                self.known[name] = mtime
        log.warning('webhook speechID=%s: attempt %d failed: %s; next in %.1f s', sid, attempt, error, delay)
        return entry['next_at']

    def _give_up(self, name, entry, why):
        entry['last_error'] = '%s (%s)' % (entry['last_error'], why)
        failed_name = self.outbox.give_up(name, entry)
        with self.cond:
            self.failed += 1
            self.known.pop(name, None)
        log.error('webhook speechID=%s: gave up after %d attempt(s): %s; kept as failed/%s',
                  entry.get('speechID'), entry['attempts'], entry['last_error'], failed_name)


def _peek(resp):
    """The start of an error answer's body, for the log and `webhook list`."""
    try:
        data = resp.raw.read(ERROR_BODY_BYTES, decode_content=True) or b''
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError, ValueError):
        # A body we only quote must never fail the attempt.
        return ''
    return ' '.join(data.decode('utf-8', 'replace').split())[:ERROR_BODY_BYTES]


def _short(exc):
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + '...'


def _safe_url(url):
    # Credentials in the URL must not reach the logs.
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (':%d' % parts.port if parts.port else ''))
    return urllib.parse.urlunsplit(parts)


# ---------------------------------------------------------------- the reporter's sink

class WebhookSink:
    """The reporter's sink: writes each finished task into the outbox (fast, in the reporter
    thread) and wakes the senders; the HTTP happens in their threads."""

    def __init__(self, settings, outbox):
        self.outbox = outbox
        self.sender = Sender(outbox, settings)

    def start(self):
        self.sender.start()

    def handle(self, event, record):
        if event != FINAL:
            return
        sid = record.speech_id
        try:
            payload = build_payload(record)
            entry = self.outbox.new_entry(sid, payload, msg_id=entry_id(payload))
            name = self.outbox.add(entry)
        except ValueError as exc:
            log.error('webhook: %s', exc)
            return
        except OSError as exc:
            # The reporter keeps the record and calls again: the entry is written once the disk lets it.
            raise Unwritten('webhook outbox entry of speechID=%s: %s' % (sid, exc.strerror or exc)) from exc
        self.sender.wake(name, entry['next_at'])

    def status(self):
        return self.sender.status()

    def close(self):
        self.sender.stop()


# ---------------------------------------------------------------- command line

def cmd_list(cfg, as_json=False):
    """`svcmgr.py webhook list`: pending and failed entries, from the files."""
    box = Outbox(outbox_dir(cfg))
    rows = []
    for failed in (False, True):
        for name in box.names(failed):
            try:
                entry = box.read(name, failed, adopt=False)
            except EntryError as exc:
                rows.append({'status': 'failed' if failed else 'pending', 'name': name, 'speechID': None,
                             'id': None, 'attempts': None, 'next_at': None, 'last_error': 'unreadable: %s' % exc})
                continue
            if entry is None:
                continue
            rows.append({'status': 'failed' if failed else 'pending', 'name': name,
                         'speechID': entry.get('speechID'), 'id': entry.get('id'),
                         'attempts': entry.get('attempts'), 'created': entry.get('created'),
                         'next_at': None if failed else entry.get('next_at'),
                         'failed_at': entry.get('failed_at'), 'last_status': entry.get('last_status'),
                         'last_error': entry.get('last_error')})
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    print('outbox %s: %d pending, %d failed' % (box.folder, sum(r['status'] == 'pending' for r in rows),
                                                  sum(r['status'] == 'failed' for r in rows)))
    if rows:
        print('%-8s %-24s %8s  %-19s  %s' % ('STATUS', 'SPEECHID', 'ATTEMPTS', 'NEXT / FAILED AT', 'LAST ERROR'))
    for r in rows:
        when = r.get('next_at') if r['status'] == 'pending' else r.get('failed_at')
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when)) if when else '-'
        print('%-8s %-24s %8s  %-19s  %s' % (r['status'], r['name'], r['attempts'] if r['attempts'] is not None
                                             else '-', when, r['last_error'] or '-'))
    return 0


def cmd_redeliver(cfg, speech_ids, all_failed=False):
    """`svcmgr.py webhook redeliver`: failed entries back into the outbox (attempts reset);
    a pending entry is made due now. A running daemon picks them up at its next rescan."""
    box = Outbox(outbox_dir(cfg))
    code = 0
    if all_failed:
        targets = box.names(failed=True)
        if not targets:
            print('no failed webhook entries')
        for name in targets:
            code |= _redeliver_failed(box, name)
        return code
    if not speech_ids:
        print('svcmgr: webhook redeliver needs speechIDs or --all-failed')
        return 2
    for sid in speech_ids:
        if not SPEECH_ID_RE.fullmatch(sid):
            print('svcmgr: not a valid speechID: %r' % sid)
            code = 1
            continue
        failed = [n for n in box.names(failed=True) if n.split('~')[0] == sid]
        pending = [n for n in box.names() if n.split('~')[0] == sid]
        if not failed and not pending:
            print('svcmgr: no webhook entry for speechID %s' % sid)
            code = 1
        for name in failed:
            code |= _redeliver_failed(box, name)
        for name in pending:
            try:
                entry = box.read(name)
            except EntryError as exc:
                print('svcmgr: %s' % exc)
                code = 1
                continue
            if entry is None:
                continue
            entry.update(attempts=0, next_at=time.time())
            box.save(name, entry)
            print('%s: pending, made due now' % name)
    return code


def _redeliver_failed(box, name):
    try:
        new = box.redeliver(name)
    except EntryError as exc:
        print('svcmgr: %s (left in failed/)' % exc)
        return 1
    except FileNotFoundError:
        print('svcmgr: failed/%s is gone' % name)
        return 1
    print('failed/%s: back in the outbox as %s' % (name, new))
    return 0
