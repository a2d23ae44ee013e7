"""The task record (TaskRecord, built once when a task ends) and the reporter thread that
hands it to every sink: first the usage records (records/YYYYMMDD.json, one JSON object a
line), then the database, the webhook outbox and the scanner. The master's loop only enqueues.
"""
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

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
        out = dataclasses.asdict(self)
        out['marks'] = [[Mark(m).value, secs] for m, secs in self.marks]
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


class RecordsFile:
    """Appends one line per finished task to <folder>/YYYYMMDD.json."""

    def __init__(self, folder):
        self.folder = folder
        self.day = None
        self.fh = None

    def _file(self, now):
        day = time.strftime('%Y%m%d', time.localtime(now))
        if day != self.day or self.fh is None:
            self.close()
            os.makedirs(self.folder, exist_ok=True)
            self.fh = open(os.path.join(self.folder, day + '.json'), 'a', encoding='utf-8')
            self.day = day
        return self.fh

    def handle(self, event, record):
        if event != FINAL:
            return
        line = json.dumps(record.to_line(), ensure_ascii=False, separators=(', ', ': ')) + '\n'
        try:
            fh = self._file(time.time())
            fh.write(line)
            fh.flush()
        except OSError as exc:
            # A full disk or a removed folder must not stop the daemon; try afresh next time.
            log.error('could not write the usage record of speechID=%s: %s', record.speech_id, exc)
            self.close()

    def close(self):
        if self.fh is not None:
            try:
                self.fh.close()
            except OSError as exc:
                log.error('closing records file: %s', exc)
            self.fh = None


class Reporter(threading.Thread):
    """Feeds each finished task to every sink, in order, off the master's loop."""

    def __init__(self, sinks):
        super().__init__(name='reporter', daemon=True)
        self.sinks = list(sinks)
        self.q = queue.Queue()
        self.written = 0

    def submit(self, event, payload):
        """Queue an event for the sinks: (ACCEPTED, task dict), (STATE, dict), (FINAL, TaskRecord)."""
        self.q.put((event, payload))

    def depth(self):
        return self.q.qsize()

    def run(self):
        while True:
            item = self.q.get()
            if item is None:
                break
            event, payload = item
            for sink in self.sinks:
                try:
                    sink.handle(event, payload)
                except Exception:  # one catch-all: a failing sink must not stop the others
                    log.error('sink %s failed on %s event', type(sink).__name__, event, exc_info=True)
            if event == FINAL:
                self.written += 1
        for sink in self.sinks:
            close = getattr(sink, 'close', None)
            if close:
                close()

    def stop(self, timeout=30):
        """Write out everything queued so far, then end the thread."""
        self.q.put(None)
        self.join(timeout)
        if self.is_alive():
            log.error('reporter did not finish within %s s; %d records still queued', timeout, self.q.qsize())
