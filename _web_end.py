"""The master's end of the web process: admits what the web submits like a client's request
(source http; the web process removes the upload afterwards), answers its snapshot queries
from the master's state, and passes it every finished task's record once it is written.

It is a reporter sink (handle() runs in the reporter thread, after the records file), so the
web never answers a transcription before its record exists.
"""
import logging

import _packet
from _link import ChildLink
from _packet import RequestError
from _records import FINAL
from _states import LinkMsg, Result, Source
from _tasks import Refused

log = logging.getLogger('master')


class WebLink(ChildLink):
    """`admit(req)` makes a task or raises Refused; `snapshot()` is what the web shows."""

    role = 'web'

    def __init__(self, loop, cfg, master_pid, extra_fds, admit, snapshot):
        super().__init__(loop, cfg, master_pid, extra_fds)
        self.admit = admit
        self.snapshot = snapshot

    @property
    def enabled(self):
        return bool(self.cfg['http']['enabled'])

    def target(self, sock, cfg, master_pid, close_fds):
        import _web     # the HTTP server's modules are the web process's business only
        _web.main(sock, cfg, master_pid, close_fds)

    def on_message(self, kind, msg):
        if kind == LinkMsg.SUBMIT and len(msg) > 2:
            self.on_submit(msg[1], msg[2])
        elif kind == LinkMsg.QUERY and len(msg) > 1:
            self.send(LinkMsg.SNAPSHOT, msg[1], self.snapshot(len(msg) < 3 or bool(msg[2])))
        else:
            super().on_message(kind, msg)

    def on_submit(self, rid, req):
        sid = req.get('speechID') if isinstance(req, dict) else None
        try:
            req = _packet.check_transcribe(req)
            task = self.admit(req)
        except RequestError as exc:
            self.send(LinkMsg.REJECTED, rid, Result.BAD_REQUEST.value, exc.message)
            return
        except Refused as exc:
            log.info('master: web speechID=%s not admitted: %s %s', sid, exc.result.value, exc.message)
            self.send(LinkMsg.REJECTED, rid, exc.result.value, exc.message)
            return
        self.send(LinkMsg.ADMITTED, rid, task.speech_id)

    # ------------------------------------------------------------ reporter sink (reporter thread)

    def handle(self, event, record):
        if event == FINAL and self.enabled:
            self.post(record.to_line())

    def tell(self, line):
        # With no web process to tell, the record is still in records/ for the next one.
        self.send(LinkMsg.ENDED, line)


def admit_http(tasks):
    """The admission the web's requests go through: the same as a client's, source http (in
    cluster mode through the cluster's queue: the answer is then a cluster Waiting, with its
    speech_id too, and the records line comes from Cluster.tell_web); the worker leaves the upload
    alone (the web process removes it after the record)."""
    return lambda req: tasks.admit(req, Source.HTTP, keep_source=True)
