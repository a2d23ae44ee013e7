"""The drop folder's fast path: an inotify watch over audio_source_path (ctypes on libc's
inotify_init1/inotify_add_watch, no extra package), and the quick settling rule it feeds.

Polling stays the rule that always works (NFS and SMB shares written from other hosts
raise no events here); this only lets a file that was closed after writing, or moved in,
be taken after scan_settle_secs instead of one whole scan interval.
"""
import ctypes
import errno
import logging
import os
import struct
import time

log = logging.getLogger('scanner')

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONTFOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF
              | IN_MOVE_SELF | IN_ONLYDIR | IN_DONTFOLLOW)
EVENT = struct.Struct('iIII')

# What a Watcher reports about a path.
WRITTEN = 'written'        # closed after writing, or moved in: complete unless written again
CHANGING = 'changing'      # created or written to: still open, polling decides
NEWDIR = 'newdir'          # a folder appeared (now watched); what it holds was never seen
OVERFLOW = 'overflow'      # the kernel dropped events: the next pass must look everywhere


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch, libc.inotify_rm_watch  # noqa: B018 (present?)
        return libc
    except (OSError, AttributeError):
        return None


class Watcher:
    """inotify watches on a folder tree, hidden folders and `skip` folders left out."""

    def __init__(self, root, skip=()):
        self.root = os.path.realpath(root)
        self.skip = {os.path.realpath(d) for d in skip}
        self.fd = -1
        self.paths = {}         # watch descriptor -> folder
        self.libc = None

    def start(self):
        """Watch the tree; False (and polling only) when inotify is not available here."""
        libc = _libc()
        if libc is None:
            log.info('scanner: inotify is not available here; polling only')
            return False
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning('scanner: inotify_init1 failed (%s); polling only', os.strerror(ctypes.get_errno()))
            return False
        self.libc, self.fd = libc, fd
        if not self.add_tree(self.root):
            self.close()
            return False
        return True

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.paths.clear()

    def add(self, folder):
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return True     # gone meanwhile
            hint = ' (raise fs.inotify.max_user_watches)' if err == errno.ENOSPC else ''
            log.warning('scanner: cannot watch %s: %s%s; polling covers it', folder, os.strerror(err), hint)
            return False
        self.paths[wd] = folder
        return True

    def add_tree(self, top):
        """Watch `top` and the folders below it; False if even `top` cannot be watched."""
        if not self.add(top):
            return False
        stack = [top]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for entry in it:
                        if self.wanted_dir(entry) and self.add(entry.path):
                            stack.append(entry.path)
            except OSError:
                continue
        return True

    def wanted_dir(self, entry):
        try:
            return (not entry.name.startswith('.') and entry.is_dir(follow_symlinks=False)
                    and os.path.realpath(entry.path) not in self.skip)
        except OSError:
            return False

    def forget_tree(self, top):
        prefix = top.rstrip('/') + '/'
        for wd, folder in list(self.paths.items()):
            if folder == top or folder.startswith(prefix):
                del self.paths[wd]
                self.libc.inotify_rm_watch(self.fd, wd)

    def read(self):
        """[(kind, path)] for the events waiting; [] when none."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, pos = [], 0
        while pos + EVENT.size <= len(data):
            wd, mask, _cookie, size = EVENT.unpack_from(data, pos)
            name = data[pos + EVENT.size:pos + EVENT.size + size].split(b'\0', 1)[0]
            pos += EVENT.size + size
            out.extend(self._event(wd, mask, os.fsdecode(name)))
        return out

    def _event(self, wd, mask, name):
        if mask & IN_Q_OVERFLOW:
            return [(OVERFLOW, self.root)]
        folder = self.paths.get(wd)
        if folder is None:
            return []
        if mask & IN_IGNORED:
            self.paths.pop(wd, None)
            return []
        if not name or name.startswith('.'):
            return []
        path = os.path.join(folder, name)
        if mask & IN_ISDIR:
            if mask & IN_MOVED_FROM:
                self.forget_tree(path)
            elif mask & (IN_CREATE | IN_MOVED_TO) and os.path.realpath(path) not in self.skip:
                self.add_tree(path)
                return [(NEWDIR, path)]
            return []
        if mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
            return [(WRITTEN, path)]
        if mask & (IN_CREATE | IN_MODIFY):
            return [(CHANGING, path)]
        return []


def signature(path):
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class QuickSettler:
    """A file is quickly settled when it was closed after writing (or moved in, or found in a
    folder that appeared), is not empty, and kept its size, mtime and inode for `settle`
    seconds with no write in between. A file written to and not closed again is left to the
    polling rule (unchanged for one scan interval)."""

    def __init__(self, settle, wanted):
        self.settle = settle
        self.wanted = wanted        # file name -> bool (the Walker's filter)
        self.due = {}               # path -> (monotonic due time, signature when noted)

    def note(self, kind, path, now=None):
        if not self.wanted(os.path.basename(path)):
            return
        if kind == CHANGING:
            self.due.pop(path, None)
            return
        sig = signature(path)
        if sig is None or not sig[0]:
            self.due.pop(path, None)
        else:
            self.due[path] = ((time.monotonic() if now is None else now) + self.settle, sig)

    def forget(self, path):
        self.due.pop(path, None)

    def next_due(self):
        return min((due for due, _ in self.due.values()), default=None)

    def ready(self, now=None):
        """Paths settled by now, oldest first; the ones that changed wait another `settle`."""
        now = time.monotonic() if now is None else now
        out = []
        for path, (due, sig) in list(self.due.items()):
            if due > now:
                continue
            current = signature(path)
            if current == sig:
                del self.due[path]
                out.append((sig[1], path))
            elif current is None or not current[0]:
                del self.due[path]
            else:
                self.due[path] = (now + self.settle, current)
        out.sort()
        return [path for _, path in out]
