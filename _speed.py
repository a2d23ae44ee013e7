"""Per-worker speed settings (issue 17): recognizers kept between calls, and the
recycling that bounds what a kept recognizer costs: a worker leaves after
`max_tasks_per_worker` tasks or once its private memory passes `max_worker_memory_mb`.
"""
import logging

import _audio

log = logging.getLogger('worker')


def apply_worker_options(engine, cfg):
    """Called in the worker before engine.open(): options that live per worker process."""
    if hasattr(engine, 'keep_recognizer'):
        engine.keep_recognizer = bool(cfg['engine']['keep_recognizer'])
    _audio.MP3_ENCODER = cfg['task']['mp3_encoder']


def private_mb(pid='self'):
    """Memory this process alone holds (MB): pages shared with the master, such as a
    model loaded before the fork, are not counted. None when /proc cannot tell."""
    try:
        with open('/proc/%s/smaps_rollup' % pid, encoding='ascii') as f:
            kb = 0
            for line in f:
                if line.startswith(('Private_Clean:', 'Private_Dirty:')):
                    kb += int(line.split()[1])
            return kb / 1024
    except (OSError, ValueError):
        return None


class Recycler:
    """Tells a worker, after each task, whether it should make way for a fresh one."""

    def __init__(self, cfg):
        self.max_tasks = int(cfg['setting']['max_tasks_per_worker'])
        self.max_mb = int(cfg['setting']['max_worker_memory_mb'])
        self.tasks = 0

    def after_task(self):
        """The reason to leave now, or None."""
        self.tasks += 1
        if self.max_tasks and self.tasks >= self.max_tasks:
            return 'recycled after %d tasks (max_tasks_per_worker)' % self.tasks
        if self.max_mb:
            mb = private_mb()
            if mb is not None and mb > self.max_mb:
                return 'recycled at %.0f MB private memory (max_worker_memory_mb = %d)' % (mb, self.max_mb)
        return None
