"""The monitor thread: every monitor_interval_secs it measures CPU, memory and disks
with psutil and publishes one immutable snapshot that Monitor (1003) answers from,
so the master's loop never waits on a measurement.
"""
import logging
import threading

import psutil

log = logging.getLogger('monitor')

# Pseudo and container filesystems say nothing about the disks a call center fills.
_SKIP_FSTYPES = {'squashfs', 'tmpfs', 'devtmpfs', 'overlay', 'proc', 'sysfs', 'cgroup', 'cgroup2',
                 'autofs', 'devpts', 'mqueue', 'debugfs', 'tracefs', 'securityfs', 'pstore',
                 'bpf', 'fusectl', 'configfs', 'hugetlbfs', 'nsfs', 'ramfs', 'binfmt_misc'}


def bytes2human(n):
    """psutil's bytes2human style: 26.7G, 512.0M, 100B."""
    symbols = ('K', 'M', 'G', 'T', 'P', 'E', 'Z', 'Y')
    prefix = {s: 1 << (i + 1) * 10 for i, s in enumerate(symbols)}
    for s in reversed(symbols):
        if abs(n) >= prefix[s]:
            return '%.1f%s' % (float(n) / prefix[s], s)
    return '%sB' % n


def measure(paths=()):
    """One snapshot of cpu, memory and disk in the shape of PROTOCOL.md's 2003."""
    cpu = psutil.cpu_times_percent(interval=None)
    mem = psutil.virtual_memory()
    disks, seen = [], set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _SKIP_FSTYPES or part.mountpoint in seen:
            continue
        seen.add(part.mountpoint)
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks.append({'device': part.device, 'mount': part.mountpoint, 'type': part.fstype,
                      'total': bytes2human(usage.total), 'used': bytes2human(usage.used),
                      'free': bytes2human(usage.free), 'percent': usage.percent})
    return {
        'cpu': {'user': cpu.user, 'system': cpu.system, 'idle': cpu.idle, 'nice': cpu.nice},
        'memory': {'total': mem.total, 'available': mem.available, 'percent': mem.percent,
                   'used': mem.used, 'free': mem.free,
                   'totalB2H': bytes2human(mem.total), 'availableB2H': bytes2human(mem.available)},
        'disk': disks,
    }


class Monitor(threading.Thread):
    """Refreshes `snapshot` every interval; readers take the reference, never a lock."""

    def __init__(self, interval, on_refresh=None):
        super().__init__(name='monitor', daemon=True)
        self.interval = interval
        self.on_refresh = on_refresh
        self.stopped = threading.Event()
        psutil.cpu_times_percent(interval=None)  # primes the counters the first sample is relative to
        self.snapshot = measure()

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                self.snapshot = measure()
                if self.on_refresh:
                    self.on_refresh(self.snapshot)
            except Exception:  # one catch-all: a failed sample keeps the last snapshot
                log.error('monitor sample failed', exc_info=True)

    def stop(self):
        self.stopped.set()
