"""Paths checked when they are used: every open, create, rename and unlink the daemon does
for a request or a scanned file goes through folder descriptors reached from an allowed
root one name at a time with O_NOFOLLOW, so a folder swapped for a symlink at any moment
makes the operation fail instead of leading it outside the roots.

The roots themselves come from app.ini (resolved once) and are trusted; everything below
them is not. Python's stdlib has no openat2(RESOLVE_BENEATH), hence the walk.
"""
import errno
import os
import re
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# `.<final name>.<pid>.tmp`: what a writer leaves behind when it is killed before its rename.
TEMP_RE = re.compile(r'\.(.+)\.(\d+)\.tmp\Z', re.S)
COPY_CHUNK = 1 << 20


class Outside(ValueError):
    """A path that does not lie below any of the allowed roots."""


def temp_name(name, pid=None):
    return '.%s.%d.tmp' % (name, os.getpid() if pid is None else pid)


def split_under(path, roots):
    """(root, [names]) for the absolute `path` below the deepest of `roots` that holds it.

    Decided on the text alone (normalized): `..` cannot climb out, and links are dealt
    with by the walk, which refuses them.
    """
    if not isinstance(path, str) or not os.path.isabs(path) or '\0' in path:
        raise Outside('not an absolute path: %r' % (path,))
    norm = os.path.normpath(path)
    if norm.startswith('//'):
        norm = '/' + norm.lstrip('/')
    best = None
    for root in roots:
        root = os.path.normpath(root)
        if norm == root or norm.startswith(root.rstrip('/') + '/'):
            if best is None or len(root) > len(best):
                best = root
    if best is None:
        raise Outside('%s is outside the allowed roots' % path)
    rest = norm[len(best):].strip('/')
    return best, [n for n in rest.split('/') if n]


class Dir:
    """An open folder reached without following links; use as a context manager."""

    __slots__ = ('fd', 'path')

    def __init__(self, fd, path):
        self.fd, self.path = fd, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def join(self, name):
        return os.path.join(self.path, name)

    # ------------------------------------------------------------ folders

    def sub(self, name, create=False):
        """The folder `name` in this one (made when `create`); a link there is refused."""
        _plain(name)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, 0o777, dir_fd=self.fd)
            except FileExistsError:
                pass        # made meanwhile by another process: open what is there
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and self._is_link(name):
                # O_DIRECTORY answers ENOTDIR for a link: say what it is.
                exc = OSError(errno.ELOOP, 'is a symbolic link', self.join(name))
            raise _no_link(exc, self.join(name)) from None
        return Dir(fd, self.join(name))

    def _is_link(self, name):
        st = self.stat(name)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def scandir(self):
        return os.scandir(self.fd)

    # ------------------------------------------------------------ files

    def open(self, name, flags=os.O_RDONLY, mode=0o666):
        _plain(name)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            raise _no_link(exc, self.join(name)) from None

    def stat(self, name):
        """lstat of `name` in this folder, or None when there is nothing of that name."""
        _plain(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_same(self, name, st):
        """True when `name` here is the very file of stat result `st`."""
        here = self.stat(name)
        return here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)

    def create_temp(self, name, mode=0o644):
        """A new empty file `.<name>.<pid>.tmp` here, opened for writing: (fd, temp name)."""
        tmp = temp_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = self.open(tmp, flags, mode)
        except FileExistsError:
            # Left by an earlier process with our pid: ours to replace.
            self.unlink(tmp)
            fd = self.open(tmp, flags, mode)
        return fd, tmp

    def replace(self, tmp, name):
        """Give temp file `tmp` its final `name` (a file already there is replaced)."""
        _plain(tmp)
        _plain(name)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def rename(self, name, dest, dest_name):
        """Move `name` here to `dest_name` in Dir `dest` (same file system)."""
        _plain(name)
        _plain(dest_name)
        os.rename(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def move(self, name, dest, dest_name, expect=None):
        """Like rename, but copies then removes across file systems (EXDEV)."""
        try:
            self.rename(name, dest, dest_name)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        src = self.open(name, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, 'not a regular file', self.join(name))
            fd, tmp = dest.create_temp(dest_name, stat.S_IMODE(st.st_mode))
            try:
                _copy(src, fd)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                dest.unlink(tmp)
                raise
            os.close(fd)
            dest.replace(tmp, dest_name)
        finally:
            os.close(src)
        self.unlink(name, expect=st)

    def unlink(self, name, expect=None):
        """Remove file `name` here; with `expect` (a stat result) only if it is still that file.

        Returns True when something was removed.
        """
        _plain(name)
        if expect is not None and not self.is_same(name, expect):
            return False
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def rmdir(self, name):
        _plain(name)
        os.rmdir(name, dir_fd=self.fd)


def open_root(root):
    """The root folder itself: configured and resolved by the operator, so followed."""
    return Dir(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), root)


def open_dir(path, roots, create=False):
    """Dir of folder `path`, walked from its root without following links.

    Raises Outside for a path outside `roots`, OSError (ELOOP, ENOTDIR, ENOENT...) when
    a folder on the way is missing (and not `create`), a link, or not a folder.
    """
    root, names = split_under(path, roots)
    current = open_root(root)
    try:
        for name in names:
            step = current.sub(name, create)
            current.close()
            current = step
    except BaseException:
        current.close()
        raise
    return current


def open_parent(path, roots, create=False):
    """(Dir of the folder holding `path`, its last name)."""
    root, names = split_under(path, roots)
    if not names:
        raise Outside('%s is a root, not a file below one' % path)
    folder = os.path.join(root, *names[:-1]) if len(names) > 1 else root
    return open_dir(folder, [root], create), names[-1]


def remove_temps(folder, pids=None, older_than=None):
    """Remove writers' temp files (TEMP_RE) in Dir `folder`: those of `pids`, or all whose
    mtime is before `older_than`. Returns how many were removed."""
    removed = 0
    with folder.scandir() as it:
        for entry in it:
            match = TEMP_RE.match(entry.name)
            if not match:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if pids is not None and int(match.group(2)) not in pids:
                    continue
                if older_than is not None and entry.stat(follow_symlinks=False).st_mtime >= older_than:
                    continue
                removed += folder.unlink(entry.name)
            except OSError:
                continue        # gone meanwhile, or not ours to remove
    return removed


def remove_temps_below(root, older_than):
    """remove_temps(older_than=...) in `root` and every folder below it, entering no link.
    A missing root is nothing to do."""
    if not os.path.isdir(root):
        return 0
    removed = 0
    stack = [open_root(root)]
    while stack:
        with stack.pop() as folder:
            removed += remove_temps(folder, older_than=older_than)
            with folder.scandir() as it:
                names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            for name in names:
                try:
                    stack.append(folder.sub(name))
                except OSError:
                    continue        # removed or swapped meanwhile: not entered
    return removed


def _plain(name):
    if not name or '/' in name or name in ('.', '..') or '\0' in name:
        raise Outside('not a plain file name: %r' % (name,))


def _no_link(exc, path):
    """ELOOP from O_NOFOLLOW means a link stood where a folder or file was expected."""
    if exc.errno == errno.ELOOP:
        return OSError(errno.ELOOP, 'is a symbolic link, not followed', path)
    return exc


def _copy(src, dst):
    while True:
        chunk = os.read(src, COPY_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def open_dir_resolved(path, roots, create=False):
    """open_dir, and when the path does not lie below a root as written, or passes a link,
    once more with the links resolved now: a link that stays inside the roots is taken,
    the walk of its target is as safe as any, and one leading out is Outside."""
    try:
        return open_dir(path, roots, create)
    except (Outside, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        real = os.path.realpath(path)
        if real == os.path.normpath(path):
            raise
        return open_dir(real, roots, create)


def open_parent_resolved(path, roots, create=False):
    """(Dir, name) like open_parent, the folder found as open_dir_resolved finds it."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise Outside('not an absolute path: %r' % (path,))
    norm = os.path.normpath(path)
    name = os.path.basename(norm)
    if not name:
        raise Outside('%s is not a file below a root' % path)
    return open_dir_resolved(os.path.dirname(norm), roots, create), name


def text(path):
    """A path as text that JSON and UTF-8 logs can hold: undecodable bytes become U+FFFD."""
    try:
        path.encode('utf-8')
        return path
    except UnicodeEncodeError:
        return path.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')
