"""The master's end of the drop-folder scanner: admits what the scanner submits like a
client's request (the scanner, not the worker, moves the file afterwards), and tells the
scanner that a task ended only once its record is written.

It is also a reporter sink (handle() runs in the reporter thread, after the records file):
that is how "ended" is never told before the record exists.
"""
import logging
import os

import _config
import _packet
import _scanner
from _link import ChildLink
from _packet import RequestError
from _records import FINAL
from _states import LinkMsg, Result, Source
from _tasks import Refused

log = logging.getLogger('master')


class ScannerLink(ChildLink):
    """`admit(req, keep_source)` makes a task or raises Refused; `available()` says whether
    the scanner should submit (an engine is there and the daemon is not stopping)."""

    role = 'scanner'

    def __init__(self, loop, cfg, master_pid, extra_fds, admit, available):
        super().__init__(loop, cfg, master_pid, extra_fds)
        self.admit = admit
        self.available = available
        self.active = set()                     # speechIDs admitted whose end the scanner has not been told
        self.engine_told = None

    @property
    def enabled(self):
        return bool(self.cfg['directory']['scan_enabled'])

    def target(self, sock, cfg, master_pid, close_fds):
        _scanner.main(sock, cfg, master_pid, close_fds)

    def on_spawned(self):
        self.engine_told = None
        self.tell_engine()

    def on_message(self, kind, msg):
        if kind == LinkMsg.SUBMIT and len(msg) > 1:
            self.on_submit(msg[1])
        else:
            super().on_message(kind, msg)

    def holds(self, req):
        """Why a client's request for a file in the drop folder is refused, or None. The
        scanner takes such a file by itself, so a client task for it would run it twice (or
        lose it to the scanner's rename); refusing is the one answer that is always right."""
        base = req.get('filePath')
        if not self.enabled or not isinstance(base, str) or not os.path.isabs(base):
            return None
        for key in ('fileID', 'fileName'):
            name = req.get(key)
            if isinstance(name, str) and name:
                path = os.path.normpath(os.path.join(base, name))
                if _config.in_drop_folder(self.cfg, os.path.realpath(path)):
                    return ('%s lies in the drop folder [directory] audio_source_path (%s), which the scanner '
                            'takes files from by itself: leave it there without a request, or move it to another '
                            'allowed root' % (path, os.path.realpath(self.cfg['directory']['audio_source_path'])))
        return None

    def on_submit(self, req):
        sid = req.get('speechID') if isinstance(req, dict) else None
        if sid in self.active:
            return      # in flight already: a restarted scanner submits again what it found claimed
        raw = req.pop(_scanner.RAW_PATH, None) if isinstance(req, dict) else None
        try:
            req = _packet.check_transcribe(req)
            self.admit(req, keep_source=True, file_path=raw)
        except RequestError as exc:
            self.send(LinkMsg.REJECTED, sid, Result.BAD_REQUEST.value, exc.message)
            return
        except Refused as exc:
            log.debug('master: scanned speechID=%s not admitted: %s %s', sid, exc.result.value, exc.message)
            self.send(LinkMsg.REJECTED, sid, exc.result.value, exc.message)
            return
        self.active.add(sid)

    def refused(self, sid, result, message):
        """A submitted file refused after its admission (cluster mode: the speechID runs elsewhere)."""
        self.active.discard(sid)
        self.send(LinkMsg.REJECTED, sid, Result(result).value, message)

    # ------------------------------------------------------------ reporter sink (reporter thread)

    def handle(self, event, record):
        if event == FINAL and record.source == Source.SCANNER:
            self.post((record.speech_id, record.result.value, record.state.value, record.message or ''))

    def tell(self, notice):
        sid, result, state, message = notice
        self.active.discard(sid)
        # With no scanner to tell, the next one finds the record at its start.
        self.send(LinkMsg.ENDED, sid, result, state, message[:_scanner.REASON_MAX])

    # ------------------------------------------------------------ the master's timers

    def tell_engine(self):
        available = bool(self.available())
        if available != self.engine_told and self.sock is not None:
            self.send(LinkMsg.ENGINE, available)
            self.engine_told = available

    def tick(self, now):
        if self.sock is not None:
            self.tell_engine()
        super().tick(now)

    def describe(self):
        body = super().describe()
        if 'pid' in body:
            body['inFlight'] = len(self.active)
        return body
