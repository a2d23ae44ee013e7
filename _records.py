"""The reporter thread: the single writer of usage records (records/YYYYMMDD.json,
one JSON object a line) and, through further sinks, of everything else that
leaves a trace of a finished task. The master's loop only enqueues.
"""
import json
import logging
import os
import queue
import threading
import time

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
    return time.strftime('%Y.%m.%d %H:%M:%S', time.localtime(t)) + '.%06d' % int((t % 1) * 1e6)


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
        line = json.dumps(record, ensure_ascii=False, separators=(', ', ': ')) + '\n'
        try:
            fh = self._file(time.time())
            fh.write(line)
            fh.flush()
        except OSError as exc:
            # A full disk or a removed folder must not stop the daemon; try afresh next time.
            log.error('could not write the usage record of speechID=%s: %s',
                      record.get('data', {}).get('speechID'), exc)
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
        """Queue an event for the sinks: (ACCEPTED, task dict), (STATE, dict), (FINAL, record)."""
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
