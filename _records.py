"""The task record (TaskRecord, built once when a task ends) and the reporter thread that
hands it to every sink: first the usage records (records/YYYYMMDD.json, one JSON object a
line), then the database, the webhook outbox and the scanner. The master's loop only enqueues.
"""
import collections
import dataclasses
import errno
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import _jsonstrict
from _states import Mark, Result, Source, State

log = logging.getLogger('records')

# What the reporter hands each sink: a task was accepted, moved to another state, or ended.
ACCEPTED, STATE, FINAL = 'accepted', 'state', 'final'


def write_synced(path, data, flags):
    """Write all of `data` to `path` (opened with `flags`) and fsync it before returning:
    the spool and the outbox promise that what they accepted survives a crash."""
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def stamp(t=None):
    """Local time as PROTOCOL.md writes it: YYYY.MM.DD HH:MM:SS.ffffff."""
    t = time.time() if t is None else t
    whole = int(t // 1)
    micro = int(round((t - whole) * 1e6))
    if micro == 1000000:
        whole, micro = whole + 1, 0
    return time.strftime('%Y.%m.%d %H:%M:%S', time.localtime(whole)) + '.%06d' % micro


def unstamp(text):
    """Epoch seconds of a stamp() string (local time); ValueError if it is not one."""
    whole, _, micro = text.rpartition('.')
    return time.mktime(time.strptime(whole, '%Y.%m.%d %H:%M:%S')) + int(micro or 0) / 1e6


@dataclass
class TaskRecord:
    """What a finished task leaves: built once by the master when the task ends, then handed
    to every sink (records file, database, webhook, scanner, web). Times stay numbers
    (epoch seconds; marks as seconds since admission) until a sink formats them."""
    speech_id: str
    source: Source
    state: State
    result: Result
    created: float                  # epoch of admission
    ended: float                    # epoch of the end
    marks: list                     # [(Mark, seconds since admission)], in order
    request: dict                   # the request's fields but speechID
    audio_path: str = None          # folder of the outputs, as admitted
    transcript: str = ''
    message: str = None
    channels: list = field(default_factory=list)    # [{'channel': 'A', 'transcript': ...}]
    source_channels: int = None
    duration: float = None
    audio_wav: str = None
    audio_mp3: str = None
    worker: int = None
    socket: int = None
    seq: int = None
    engine_result: str = None       # what the engine said when the client had left (result 8)
    segments: list = None           # the engine's utterances, _segments.build's form
    confidence: float = None        # mean word confidence

    def mark_secs(self, mark):
        """Seconds since admission of the last `mark`, or None."""
        found = [secs for m, secs in self.marks if m == mark]
        return found[-1] if found else None

    def to_line(self):
        """The records/YYYYMMDD.json line (1.0's layout and names, new keys after them)."""
        line = {
            'data': {'speechID': self.speech_id, 'transcript': self.transcript, 'result': self.result.value},
            'socket': self.socket,
            'state': self.state.value,
            'startTime': stamp(self.created),
            'endTime': stamp(self.ended),
            'processInterval': ['%.6f < %s' % (secs, Mark(mark).value) for mark, secs in self.marks],
            'source': self.source.value,
            'worker': self.worker,
            'duration': self.duration,
            'request': self.request,
        }
        optional = (('message', self.message), ('channels', self.channels or None),
                    ('audioWAV', self.audio_wav), ('audioMP3', self.audio_mp3), ('seq', self.seq),
                    ('engineResult', self.engine_result), ('sourceChannels', self.source_channels),
                    ('audioPath', self.audio_path), ('confidence', self.confidence), ('segments', self.segments))
        line.update((key, value) for key, value in optional if value is not None)
        return line

    @classmethod
    def from_line(cls, line):
        """The record of a records line (also what 2.0's database spool held); ValueError,
        KeyError or TypeError when it is not one."""
        data = line['data']
        marks = []
        for text in line.get('processInterval') or ():
            secs, _, mark = text.partition(' < ')
            marks.append((Mark(mark), float(secs)))
        return cls(
            speech_id=data['speechID'], source=Source(line.get('source') or Source.CLIENT.value),
            state=State(line['state']), result=Result(str(data['result'])),
            created=unstamp(line['startTime']), ended=unstamp(line['endTime']), marks=marks,
            request=line.get('request') or {}, audio_path=line.get('audioPath'),
            transcript=data.get('transcript') or '', message=line.get('message'),
            channels=line.get('channels') or [], source_channels=line.get('sourceChannels'),
            duration=line.get('duration'), audio_wav=line.get('audioWAV'), audio_mp3=line.get('audioMP3'),
            worker=line.get('worker'), socket=line.get('socket'), seq=line.get('seq'),
            engine_result=line.get('engineResult'), segments=line.get('segments'),
            confidence=line.get('confidence'))

    def to_dict(self):
        """A JSON-ready dict with numbers kept as numbers (the database spool's form)."""
        # Not dataclasses.asdict: its deep copy of the segments (every word a dict) cost the
        # master's reporter more than the record's own line. The containers are copied one level;
        # what is inside them is shared, and no sink changes it.
        out = {f.name: getattr(self, f.name) for f in _RECORD_FIELDS}
        out['marks'] = [[Mark(m).value, secs] for m, secs in self.marks]
        out['request'] = dict(self.request)
        out['channels'] = list(self.channels)
        if self.segments is not None:
            out['segments'] = list(self.segments)
        return out

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict(); a records line (an older spool's form) is read too."""
        if 'data' in d:
            return cls.from_line(d)
        values = dict(d)
        values.update(source=Source(d['source']), state=State(d['state']), result=Result(str(d['result'])),
                      marks=[(Mark(m), float(secs)) for m, secs in d.get('marks') or ()])
        return cls(**values)


_RECORD_FIELDS = dataclasses.fields(TaskRecord)


def last_seq(folder, day):
    """The highest seq recorded on `day`, so the per-day counter goes on after a restart."""
    best = 0
    try:
        with open(os.path.join(folder, day + '.json'), encoding='utf-8') as f:
            for line in f:
                if '"seq"' in line:
                    try:
                        best = max(best, int(json.loads(line).get('seq') or 0))
                    except (ValueError, TypeError, AttributeError):
                        continue
    except OSError:
        pass
    return best


class Unwritten(Exception):
    """A sink could not make a record durable now (a full disk, a folder gone meanwhile):
    the reporter keeps the record, tries that sink again, and later sinks wait for it."""


class RecordsFile:
    """Appends one line per finished task to <folder>/YYYYMMDD.json. The lines the reporter
    hands over in one go are fsync'd together (commit()) before the next sink hears of any
    of them. A torn last line (a write cut short by a full disk or a crash) is cut back to
    the last whole line before anything is appended; a file or folder removed meanwhile is
    made again. Any failure takes back every line since the last commit: Unwritten."""

    def __init__(self, folder):
        self.folder = folder
        self.day = None
        self.fd = None
        self.ident = None           # (st_dev, st_ino) of the open file, to notice it was removed
        self.synced = None          # the file's size at the last commit, while lines wait for one

    def _path(self, day):
        return os.path.join(self.folder, day + '.json')

    def _still_there(self):
        try:
            st = os.stat(self._path(self.day))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def _file(self, now):
        day = time.strftime('%Y%m%d', time.localtime(now))
        if self.fd is not None and day == self.day:
            if self._still_there():
                return self.fd
            log.warning('records: %s was removed or replaced; making it again', self._path(day))
            if self.synced is not None:
                raise OSError(errno.ENOENT, 'the file was removed before its last lines were synced')
        if self.fd is not None:
            self.commit()               # midnight: yesterday's last lines first
        self.close()
        os.makedirs(self.folder, exist_ok=True)
        path = self._path(day)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            repair_tail(fd, path)
            st = os.fstat(fd)
            fsync_dir(self.folder)      # a new file's name must be on disk with its first line
        except OSError:
            os.close(fd)
            raise
        self.fd, self.day, self.ident = fd, day, (st.st_dev, st.st_ino)
        return fd

    def handle(self, event, record):
        if event != FINAL:
            return
        data = encode_line(record.to_line())
        try:
            fd = self._file(time.time())
            if self.synced is None:
                self.synced = os.fstat(fd).st_size
            write_all(fd, data)
        except OSError as exc:
            self._fail(exc)

    def commit(self):
        """fsync what handle() wrote since the last commit; Unwritten takes all of it back."""
        if self.fd is None or self.synced is None:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self._fail(exc)
        self.synced = None

    def _fail(self, exc):
        # A part written is a torn line, and lines not synced were never passed on: take them back.
        if self.fd is not None and self.synced is not None:
            try:
                os.ftruncate(self.fd, self.synced)
            except OSError:
                pass                    # cut at the next open instead
        self.synced = None
        self.close()
        raise Unwritten('records/%s.json: %s' % (self.day or time.strftime('%Y%m%d'),
                                                 exc.strerror or exc)) from exc

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError as exc:
                log.error('closing records file: %s', exc)
            self.fd = self.ident = None


def encode_line(line):
    """A records line as bytes: strict JSON, UTF-8 (escaped ASCII if a lone surrogate slipped in)."""
    text = _jsonstrict.dumps(line, ensure_ascii=False, separators=(', ', ': '))
    try:
        return (text + '\n').encode('utf-8')
    except UnicodeEncodeError:
        return (_jsonstrict.dumps(line, ensure_ascii=True, separators=(', ', ': ')) + '\n').encode('ascii')


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def repair_tail(fd, path):
    """Cut a file that does not end in a newline back to its last whole line (fd read-write)."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b'\n':
        return
    end, keep = size, 0
    while end > 0:
        start = max(0, end - 65536)
        found = os.pread(fd, end - start, start).rfind(b'\n')
        if found >= 0:
            keep = start + found + 1
            break
        end = start
    torn = os.pread(fd, min(size - keep, 200), keep)
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.error('records: %s ended in a torn line (%d bytes, a write cut short); cut back to the last '
              'whole line: %r', path, size - keep, torn)


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Reporter(threading.Thread):
    """Feeds each event to every sink, in order, off the master's loop.

    A finished task's record goes through the sinks one by one; when one raises Unwritten
    the record waits (with every later one, in order) and that sink is tried again every
    RETRY_SECS, so nothing downstream (the scanner above all) hears of a task whose record
    is not on disk. Meanwhile `trouble` says why, and the master refuses new tasks.
    """

    RETRY_SECS = 1.0
    REMIND_SECS = 30.0
    BATCH = 256

    def __init__(self, sinks):
        super().__init__(name='reporter', daemon=True)
        self.sinks = list(sinks)
        self.q = queue.Queue()
        self.written = 0
        self.backlog = collections.deque()      # [record, index of the sink to try next, failed before]
        self.trouble = None                     # {'since', 'error', ...} while records cannot be written
        self.reminded = 0.0

    def submit(self, event, payload):
        """Queue an event for the sinks: (ACCEPTED, task dict), (STATE, dict), (FINAL, TaskRecord)."""
        self.q.put((event, payload))

    def depth(self):
        return self.q.qsize()

    def blocked(self):
        """Why no task should be taken now (records cannot be written), or None."""
        trouble = self.trouble
        return trouble['error'] if trouble else None

    def status(self):
        """Monitor's records object (read from the master's thread)."""
        trouble = self.trouble
        body = {'ok': trouble is None, 'written': self.written, 'unwritten': len(self.backlog)}
        if trouble:
            body.update(error=trouble['error'], since=trouble['since'])
        return body

    def run(self):
        stopping = False
        while not stopping:
            try:
                batch = [self.q.get(timeout=self.RETRY_SECS if self.backlog else None)]
            except queue.Empty:
                batch = []
            # Whatever queued meanwhile goes in the same round: its records share one fsync.
            while batch and batch[-1] is not None and len(batch) < self.BATCH:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if item is None:
                    stopping = True
                elif item[0] == FINAL:
                    self.backlog.append([item[1], 0, False])
                else:
                    self._event(*item)
            if self.backlog:
                self._drain()
        self._give_up()
        for sink in self.sinks:
            close = getattr(sink, 'close', None)
            if close:
                close()

    def _event(self, event, payload):
        for sink in self.sinks:
            try:
                self._call(sink, event, payload)
            except Unwritten as exc:
                log.error('sink %s could not take a %s event: %s', type(sink).__name__, event, exc)

    def _call(self, sink, event, payload):
        try:
            sink.handle(event, payload)
        except Unwritten:
            raise
        except Exception:  # one catch-all: a failing sink must not stop the others
            log.error('sink %s failed on %s event', type(sink).__name__, event, exc_info=True)

    def _drain(self):
        """Hand the waiting records on, sink by sink, oldest first: a record reaches a sink
        only after every older one did, and passes a sink with commit() only once committed."""
        failed = False
        for stage, sink in enumerate(self.sinks):
            passed, error = [], None
            for entry in self.backlog:
                if entry[1] < stage:
                    break               # an older record still waits before this sink
                if entry[1] > stage:
                    continue
                try:
                    self._call(sink, FINAL, entry[0])
                except Unwritten as exc:
                    error = str(exc)
                    self._failing(entry, error)
                    break
                entry[1] = stage + 1
                passed.append(entry)
            commit = getattr(sink, 'commit', None)
            if commit is not None and passed and error is None:
                try:
                    commit()
                except Unwritten as exc:
                    error = str(exc)
            if commit is not None and error is not None:
                # What the sink took since its last commit is gone again: those records wait too.
                for entry in passed:
                    entry[1] = stage
                    self._failing(entry, error)
            failed = failed or error is not None
        while self.backlog and self.backlog[0][1] >= len(self.sinks):
            self.backlog.popleft()
            self.written += 1
        if not failed and not self.backlog and self.trouble:
            log.warning('records: written again after %.0f s (%s); new tasks are taken again',
                        time.time() - unstamp(self.trouble['since']), self.trouble['error'])
            self.trouble = None

    def _failing(self, entry, error):
        now = time.time()
        record = entry[0]
        if not entry[2]:
            entry[2] = True
            log.error('could not write the usage record of speechID=%s: %s; it is kept and written when '
                      'the disk lets it (a scanned file stays where it is until then)', record.speech_id, error)
        if self.trouble is None:
            self.trouble = {'since': stamp(now), 'error': error}
            self.reminded = now
            log.error('records: cannot be written (%s): new tasks are refused with result 3 until they can',
                      error)
        elif now - self.reminded >= self.REMIND_SECS:
            self.reminded = now
            log.error('records: still cannot be written (%s) since %s: %d record(s) waiting, new tasks refused',
                      error, self.trouble['since'], len(self.backlog))
        self.trouble = dict(self.trouble, error=error)

    def _give_up(self):
        """At stop: what still could not be written goes into the log, the last place left."""
        if not self.backlog:
            return
        log.error('records: %d record(s) could not be written before the stop; their lines follow '
                  '(scanned files among them stay claimed and run again at the next start)', len(self.backlog))
        for record, _, _ in self.backlog:
            log.error('records: unwritten line: %s', encode_line(record.to_line()).decode('utf-8', 'replace').rstrip())
        self.backlog.clear()

    def stop(self, timeout=30):
        """Write out everything queued so far, then end the thread."""
        self.q.put(None)
        self.join(timeout)
        if self.is_alive():
            log.error('reporter did not finish within %s s; %d records still queued', timeout, self.q.qsize())
