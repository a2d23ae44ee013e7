"""The PacketAgent worker process: takes one job at a time from its pipe to the
master, opens the source safely, prepares the audio with PyAV, runs the engine
channel by channel and sends progress and the result back.
"""
import errno
import logging
import os
import stat
import time

import _audio
import _children
import _config
import _safepath
import _segments
import _speed
import _vad
from _jobs import Outcome
from _states import Result, State, WorkerMsg

log = logging.getLogger('worker')

# Words of one channel further apart than this start a new line in a stereo transcript
# (the transcript's lines are as they always were; segments follow the engine's utterances).
UTTERANCE_GAP_SECS = 0.8
WORKER_NICE = 5


class JobError(Exception):
    """A job that ends before recognition, with its state and result."""

    def __init__(self, state, result, message):
        super().__init__(message)
        self.state, self.result, self.message = state, result, message


class Source:
    """The source file of the job in hand, opened without following links: its folder (a
    _safepath.Dir), its name there, the open descriptor and its stat."""

    def __init__(self, folder, name, fd):
        self.folder, self.name, self.fd = folder, name, fd
        self.st = os.fstat(fd)
        self.path = _safepath.text(folder.join(name))

    def close(self):
        os.close(self.fd)
        self.folder.close()


def open_source(candidates, roots):
    """Open the first existing candidate as a Source.

    Every folder on the way is opened from its root with O_NOFOLLOW, so a folder or a
    file swapped for a symlink at any moment cannot lead outside the roots.
    """
    for path in candidates:
        try:
            return _open_below(path, roots)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except _safepath.Outside:
            raise JobError(State.ERROR, Result.BAD_REQUEST,
                           'the audio file resolves outside the allowed roots: %s' % _safepath.text(path)) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise JobError(State.ERROR, Result.BAD_REQUEST, 'the path of the audio file passes a symbolic '
                               'link that is not followed: %s' % _safepath.text(path)) from exc
            raise JobError(State.NOFILE_ID, Result.NOT_FOUND, 'fileID cannot be opened: %s (%s)'
                           % (_safepath.text(path), exc.strerror)) from exc
    raise JobError(State.NOFILE_ID, Result.NOT_FOUND, 'fileID not found: %s' % _safepath.text(candidates[0]))


def _open_below(path, roots):
    folder, name = _safepath.open_parent_resolved(path, roots)
    try:
        try:
            # O_NONBLOCK: a FIFO planted as the source must not hang the worker.
            fd = folder.open(name, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            # The file is a link: taken only where its target lies inside the roots.
            real = os.path.realpath(folder.join(name))
            folder.close()
            folder = None
            folder, name = _safepath.open_parent(real, roots)
            fd = folder.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except BaseException:
        if folder is not None:
            folder.close()
        raise
    source = Source(folder, name, fd)
    if not stat.S_ISREG(source.st.st_mode):
        source.close()
        raise JobError(State.NOFILE_ID, Result.NOT_FOUND, 'fileID is not a regular file: %s' % source.path)
    return source


def open_outputs(job):
    """The audioPath folder, made where missing, reached like the source."""
    try:
        return _safepath.open_dir_resolved(job.audio_path, job.roots, create=True)
    except _safepath.Outside:
        raise JobError(State.ERROR, Result.BAD_REQUEST,
                       'audioPath resolves outside the allowed roots: %s' % _safepath.text(job.audio_path)) from None
    except OSError as exc:
        raise JobError(State.NOFILE_WAV, Result.ERROR, 'cannot write to audioPath %s: %s'
                       % (_safepath.text(job.audio_path), exc.strerror)) from exc


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
        self.real = None              # the source file actually opened for the job in hand (text)
        self.source = None            # its Source
        self.outputs = None           # the audioPath folder (a _safepath.Dir)
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
        self.real = self.source = self.outputs = None
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
        finally:
            for held in (self.source, self.outputs):
                if held is not None:
                    held.close()
            self.source = self.outputs = None
        leaving = self.recycler.after_task()
        if leaving:
            # Before DONE, so the master gives this worker no further task.
            log.info('%s: %s', self.name, leaving)
            self.send(WorkerMsg.LEAVING, sid, leaving)
        self.send(WorkerMsg.DONE, sid, outcome)

    def process(self, job, tag):
        sid = job.speech_id
        self.send(WorkerMsg.STATE, sid, State.CONVERT.value)
        self.source = source = open_source(job.candidates, job.roots)
        self.real = source.path
        self.src_alias = '/proc/self/fd/%d' % source.fd
        # No work nobody asked for: an embedded engine reads the PCM itself, so the 8 kHz WAV
        # is written only when it is kept; the audioPath folder is not even opened when no
        # file is wanted there.
        write_wav = job.keep_wav or not self.engine.embedded
        if write_wav or job.mp3_backup or job.subtitles:
            self.outputs = open_outputs(job)
        prepared = _audio.prepare(self.src_alias, self.engine.sample_rate,
                                  audio_path=self.outputs if write_wav or job.mp3_backup else None,
                                  stem=job.stem, mp3_backup=job.mp3_backup, source_stat=source.st,
                                  write_wav=write_wav)
        if prepared.kept:
            log.warning('%s: %s is the source itself: kept as it is, not overwritten nor removed',
                        tag, ', '.join(prepared.kept))
        log.info('%s: converted %s (%.2f s, %d channel(s)%s)', tag, source.path, prepared.duration,
                 prepared.source_channels, ', dual mono' if prepared.dual_mono else '')
        self.beat()
        done = Outcome(State.DONE, Result.OK, duration=round(prepared.duration, 3),
                       source_channels=prepared.source_channels,
                       # The answer names the WAV as 1.0 did, also when keep_wav = false left none.
                       audio_wav=prepared.audio_wav or job.stem + '.wav', audio_mp3=prepared.audio_mp3)
        if not self.engine.embedded:
            # A remote engine reads the prepared files; the master sends it the 3001.
            self.remove_source(job, prepared, tag)
            done.state, done.prepared = State.RECOGNIZE, True
            return done
        self.send(WorkerMsg.STATE, sid, State.RECOGNIZE.value)
        recognitions = self.recognize(prepared, tag)
        self.answer(done, recognitions, job)
        self.write_subtitles(job, done, tag)
        self.cleanup_after_success(job, prepared, tag)
        return done

    def recognize(self, prepared, tag):
        """[(channel label, Recognition)] of the prepared PCM, channel by channel; the VAD
        gate (_vad.py, [engine] vad) sends only speech to the engine."""
        recs = _vad.recognize(self.engine, prepared.engine_pcm, self.vad, beat=self.beat, tag=tag)
        recognitions = [('AB'[i], rec) for i, rec in enumerate(recs)]
        del prepared.engine_pcm[:]
        return recognitions

    @staticmethod
    def answer(done, recognitions, job):
        """Fill the Outcome from the engine's recognitions: transcript, channels, segments."""
        if len(recognitions) == 1:
            done.transcript = recognitions[0][1].text
        else:
            done.transcript = merge_channels(recognitions)
        done.channels = [{'channel': label, 'transcript': rec.text} for label, rec in recognitions]
        done.segments = _segments.build(recognitions, job.low_confidence)
        done.confidence = _segments.mean_confidence(done.segments)

    def write_subtitles(self, job, done, tag):
        """<stem>.srt / <stem>.vtt beside the WAV when [task] subtitles asks for them, in the
        audioPath folder reached without following links."""
        for fmt in job.subtitles:
            name = '%s.%s' % (job.stem, fmt)
            if self.source is not None and self.outputs.is_same(name, self.source.st):
                log.warning('%s: %s is the source itself: not overwritten', tag, name)
                continue
            tmp = None
            try:
                fd, tmp = self.outputs.create_temp(name)
                with open(fd, 'w', encoding='utf-8') as f:
                    f.write(_segments.RENDER[fmt](done.segments))
                self.outputs.replace(tmp, name)
            except OSError as exc:
                # The transcript is the task's result; a subtitle that cannot be written is logged.
                log.error('%s: cannot write %s in %s: %s', tag, name, _safepath.text(job.audio_path), exc)
                if tmp is not None:
                    _unlink(self.outputs, tmp, tag)

    def cleanup_after_success(self, job, prepared, tag):
        if not job.keep_wav and prepared.audio_wav:
            for name in [prepared.audio_wav] + list(prepared.channel_files):
                if name not in prepared.kept:
                    _unlink(self.outputs, name, tag)
        self.remove_source(job, prepared, tag)

    def remove_source(self, job, prepared, tag):
        """source_after = delete: the very file opened, by its folder's descriptor, and
        only while its name still holds that file; never when it stands for an output."""
        if job.source_after != 'delete' or job.keep_source or prepared.kept:
            return
        src = self.source
        _unlink(src.folder, src.name, tag, expect=src.st)

    def backup_failed_source(self, job, tag, reason):
        """1.0 moved a source that failed conversion into error_backup_path."""
        src = self.source
        if src is None or job.keep_source or job.source_after != 'delete':
            return
        dest_dir = job.error_backup_path
        try:
            os.makedirs(dest_dir, exist_ok=True)        # configured by the operator: trusted
            with _safepath.open_root(dest_dir) as dest:
                name = src.name
                if dest.stat(name) is not None:
                    name = '%s_%s' % (job.speech_id, name)
                fd, tmp = dest.create_temp(name + '.reason')
                with os.fdopen(fd, 'w', encoding='utf-8', errors='replace') as f:
                    f.write(reason + '\n')
                dest.replace(tmp, name + '.reason')
                src.folder.move(src.name, dest, name, expect=src.st)
            log.info('%s: moved failed source to %s', tag, _safepath.text(os.path.join(dest_dir, name)))
        except OSError as exc:
            log.error('%s: could not move failed source %s to %s: %s', tag, src.path, dest_dir, exc)


def _unlink(folder, name, tag, expect=None):
    try:
        folder.unlink(name, expect=expect)
    except OSError as exc:
        log.warning('%s: could not remove %s: %s', tag, _safepath.text(folder.join(name)), exc)


def output_names(job):
    """Every file a job may write in its audioPath."""
    return [job.stem + suffix for suffix in ('.wav', '_A.wav', '_B.wav', '.mp3', '.srt', '.vtt')]


def remove_job_temps(job, pid):
    """The hidden temp outputs a worker (`pid`) killed mid-conversion left for `job`:
    removed by their exact names, so the cost is a walk and four unlinks, no listing."""
    removed = 0
    try:
        with _safepath.open_dir_resolved(job.audio_path, job.roots) as folder:
            for name in output_names(job):
                removed += folder.unlink(_safepath.temp_name(name, pid))
    except (OSError, ValueError) as exc:
        log.debug('master: no temp files of worker pid %d to remove in %s: %s', pid, job.audio_path, exc)
    if removed:
        log.info('master: removed %d temp file(s) of worker pid %d in %s', removed, pid,
                 _safepath.text(job.audio_path))
    return removed


def sweep_at_start(cfg, before):
    """At start (in a thread of the master): temp files left in svcmgr's output folders by
    the workers of an earlier run, those last changed before `before`."""
    folders = [cfg['directory']['audio_target_path'], cfg['task']['error_backup_path'],
               cfg['directory']['scan_done_path']]
    removed = 0
    for root in dict.fromkeys(os.path.realpath(f) for f in folders):
        try:
            removed += _safepath.remove_temps_below(root, before)
        except OSError as exc:
            log.warning('master: cannot sweep temp files in %s: %s', root, exc)
    log.log(logging.INFO if removed else logging.DEBUG,
            'master: removed %d temp file(s) left by an earlier run', removed)
    return removed


def main(worker_id, hb_index, conn, engine, cfg, heartbeats, master_pid, close_fds=()):
    """Entry point of the worker process (multiprocessing target)."""
    PacketAgent(worker_id, hb_index, conn, engine, cfg, heartbeats, master_pid, close_fds).run()
