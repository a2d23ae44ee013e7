"""The PacketAgent worker process: takes one job at a time from its pipe to the
master, opens the source safely, prepares the audio with PyAV, runs the engine
channel by channel and sends progress and the result back.
"""
import logging
import os
import shutil
import stat
import time

import _audio
import _children
import _config
import _speed
import _vad
from _config import inside
from _jobs import Outcome
from _states import Result, State, WorkerMsg

log = logging.getLogger('worker')

# Words of one channel further apart than this start a new line in a stereo transcript.
UTTERANCE_GAP_SECS = 0.8
WORKER_NICE = 5


class JobError(Exception):
    """A job that ends before recognition, with its state and result."""

    def __init__(self, state, result, message):
        super().__init__(message)
        self.state, self.result, self.message = state, result, message


def open_source(candidates, roots):
    """Open the first existing candidate and return (fd, resolved path).

    The check runs on the file actually opened (/proc/self/fd), so a symlink
    swapped after the master's check cannot lead outside the roots.
    """
    for path in candidates:
        try:
            # O_NONBLOCK: a FIFO planted as the source must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise JobError(State.NOFILE_ID, Result.NOT_FOUND,
                           'fileID cannot be opened: %s (%s)' % (path, exc.strerror)) from exc
        real = os.readlink('/proc/self/fd/%d' % fd)
        if not inside(real, roots):
            os.close(fd)
            raise JobError(State.ERROR, Result.BAD_REQUEST,
                           'the audio file resolves outside the allowed roots: %s' % path)
        if not _is_regular(fd):
            os.close(fd)
            raise JobError(State.NOFILE_ID, Result.NOT_FOUND, 'fileID is not a regular file: %s' % path)
        return fd, real
    raise JobError(State.NOFILE_ID, Result.NOT_FOUND, 'fileID not found: %s' % candidates[0])


def _is_regular(fd):
    return stat.S_ISREG(os.fstat(fd).st_mode)


def merge_channels(recognitions):
    """One transcript for a stereo call: utterances of A and B as lines in time order."""
    lines = []
    for label, rec in recognitions:
        utterance, last_end = [], None
        for w in rec.words:
            if utterance and w.start - last_end > UTTERANCE_GAP_SECS:
                lines.append((utterance[0].start, label, utterance))
                utterance = []
            utterance.append(w)
            last_end = w.end
        if utterance:
            lines.append((utterance[0].start, label, utterance))
        if not rec.words and rec.text:
            lines.append((0.0, label, None))
    lines.sort(key=lambda item: (item[0], item[1]))
    out = []
    for _, label, words in lines:
        text = ' '.join(w.word for w in words) if words is not None else dict(recognitions)[label].text
        out.append('%s: %s' % (label, text))
    return '\n'.join(out)


class PacketAgent:
    """One worker: the loop over jobs from the master's pipe."""

    def __init__(self, worker_id, hb_index, conn, engine, cfg, heartbeats, master_pid, close_fds=()):
        self.close_fds = close_fds
        self.id = worker_id
        self.hb_index = hb_index
        self.conn = conn
        self.engine = engine
        self.cfg = cfg
        self.heartbeats = heartbeats
        self.master_pid = master_pid
        self.stopping = False
        self.reopen = False
        self.src_alias = None
        self.real = None              # the source file actually opened for the job in hand
        self.name = 'worker-%d' % worker_id

    def beat(self):
        self.heartbeats[self.hb_index] = time.monotonic()

    def send(self, kind, sid, payload):
        self.conn.send((kind, sid, payload))

    def run(self):
        # Workers yield the CPU to the master, so its loop answers promptly while every core decodes.
        if not _children.become_child(self, self.cfg, 'svcmgr: worker %d' % self.id, self.name, self.master_pid,
                                      self.close_fds, nice=WORKER_NICE):
            return
        _speed.apply_worker_options(self.engine, self.cfg)
        self.recycler = _speed.Recycler(self.cfg)
        self.vad = _vad.VadSettings.from_config(self.cfg)
        self.engine.open()
        log.info('%s: ready (pid %d)', self.name, os.getpid())
        hb = float(self.cfg['setting']['heartbeat_secs'])
        while not self.stopping:
            self.beat()
            if self.reopen:
                self.reopen = False
                _config.reopen_logs()
            if os.getppid() != self.master_pid:
                log.warning('%s: master is gone, exiting', self.name)
                return
            try:
                if not self.conn.poll(hb):
                    continue
                job = self.conn.recv()
            except (EOFError, OSError):
                log.info('%s: pipe to master closed, exiting', self.name)
                return
            except InterruptedError:
                continue
            if job is None:
                break
            self.beat()
            self.handle(job)
        log.info('%s: stopped', self.name)

    def handle(self, job):
        sid = job.speech_id
        tag = '%s speechID=%s' % (self.name, sid)
        self.real = None
        try:
            outcome = self.process(job, tag)
        except JobError as exc:
            log.warning('%s: %s', tag, exc.message)
            outcome = Outcome.failed(exc.state, exc.result, exc.message)
        except _audio.AudioError as exc:
            # The audio was read through /proc/self/fd/N: name the real file instead.
            message = exc.message.replace(self.src_alias or '\0', self.real or '?')
            log.warning('%s: %s', tag, message)
            outcome = Outcome.failed(exc.state, exc.result, message)
            self.backup_failed_source(job, tag, message)
        except Exception as exc:  # the one catch-all of this loop: an engine failure must not kill us
            log.error('%s: engine failed: %s', tag, exc, exc_info=True)
            outcome = Outcome.failed(State.ERROR, Result.ERROR, 'engine failed: %s' % exc)
        leaving = self.recycler.after_task()
        if leaving:
            # Before DONE, so the master gives this worker no further task.
            log.info('%s: %s', self.name, leaving)
            self.send(WorkerMsg.LEAVING, sid, leaving)
        self.send(WorkerMsg.DONE, sid, outcome)

    def process(self, job, tag):
        sid = job.speech_id
        self.send(WorkerMsg.STATE, sid, State.CONVERT.value)
        fd, real = open_source(job.candidates, job.roots)
        self.real = real
        self.src_alias = '/proc/self/fd/%d' % fd
        try:
            prepared = _audio.prepare(self.src_alias, self.engine.sample_rate,
                                      audio_path=job.audio_path, stem=job.stem,
                                      mp3_backup=job.mp3_backup)
        finally:
            os.close(fd)
        log.info('%s: converted %s (%.2f s, %d channel(s)%s)', tag, real, prepared.duration,
                 prepared.source_channels, ', dual mono' if prepared.dual_mono else '')
        self.beat()
        done = Outcome(State.DONE, Result.OK, duration=round(prepared.duration, 3),
                       source_channels=prepared.source_channels,
                       audio_wav=prepared.audio_wav, audio_mp3=prepared.audio_mp3)
        if not self.engine.embedded:
            # A remote engine reads the prepared files; the master sends it the 3001.
            if job.source_after == 'delete' and not job.keep_source:
                _unlink(real, tag)
            done.state, done.prepared = State.RECOGNIZE, True
            return done
        self.send(WorkerMsg.STATE, sid, State.RECOGNIZE.value)
        labels = 'AB'
        # The VAD gate (_vad.py, [engine] vad) sends only speech to the engine.
        recs = _vad.recognize(self.engine, prepared.engine_pcm, self.vad, beat=self.beat, tag=tag)
        recognitions = [(labels[i], rec) for i, rec in enumerate(recs)]
        del prepared.engine_pcm[:]
        if len(recognitions) == 1:
            done.transcript = recognitions[0][1].text
        else:
            done.transcript = merge_channels(recognitions)
        done.channels = [{'channel': label, 'transcript': rec.text} for label, rec in recognitions]
        self.cleanup_after_success(job, prepared, real, tag)
        return done

    def cleanup_after_success(self, job, prepared, real, tag):
        if not job.keep_wav:
            for name in [prepared.audio_wav] + list(prepared.channel_files):
                _unlink(os.path.join(job.audio_path, name), tag)
        if job.source_after == 'delete' and not job.keep_source:
            _unlink(real, tag)

    def backup_failed_source(self, job, tag, reason):
        """1.0 moved a source that failed conversion into error_backup_path."""
        real = self.real
        if not real or job.keep_source or job.source_after != 'delete':
            return
        dest_dir = job.error_backup_path
        name = os.path.basename(real)
        try:
            os.makedirs(dest_dir, exist_ok=True)
            dest = os.path.join(dest_dir, name)
            if os.path.lexists(dest):
                dest = os.path.join(dest_dir, '%s_%s' % (job.speech_id, name))
            shutil.move(real, dest)
            with open(dest + '.reason', 'w', encoding='utf-8') as f:
                f.write(reason + '\n')
            log.info('%s: moved failed source to %s', tag, dest)
        except OSError as exc:
            log.error('%s: could not move failed source %s to %s: %s', tag, real, dest_dir, exc)


def _unlink(path, tag):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning('%s: could not remove %s: %s', tag, path, exc)


def main(worker_id, hb_index, conn, engine, cfg, heartbeats, master_pid, close_fds=()):
    """Entry point of the worker process (multiprocessing target)."""
    PacketAgent(worker_id, hb_index, conn, engine, cfg, heartbeats, master_pid, close_fds).run()
