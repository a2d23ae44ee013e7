"""Unit tests of _safepath: walking below a root without following links."""
import errno
import os
import time

import pytest

import _safepath
from _safepath import Outside, open_dir, open_parent, remove_temps, split_under


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / 'root'
    outside = tmp_path / 'outside'
    (root / 'a' / 'b').mkdir(parents=True)
    outside.mkdir()
    (outside / 'secret.wav').write_bytes(b'secret')
    (root / 'a' / 'b' / 'f.wav').write_bytes(b'data')
    return str(root), str(outside)


def test_split_under_picks_the_deepest_root_and_refuses_outside():
    assert split_under('/r/a/../b/c', ['/r']) == ('/r', ['b', 'c'])
    assert split_under('/r/in/x', ['/r', '/r/in']) == ('/r/in', ['x'])
    assert split_under('/r', ['/r']) == ('/r', [])
    for bad in ('/r/../etc', '/rr/x', 'r/x', '/r/x\0', '/etc'):
        with pytest.raises(Outside):
            split_under(bad, ['/r'])


def test_open_dir_walks_and_creates(tree):
    root, _ = tree
    with open_dir(os.path.join(root, 'a', 'b'), [root]) as d:
        fd = d.open('f.wav')
        assert os.read(fd, 10) == b'data'
        os.close(fd)
    with open_dir(os.path.join(root, 'new', 'day'), [root], create=True) as d:
        assert d.path == os.path.join(root, 'new', 'day')
    assert os.path.isdir(os.path.join(root, 'new', 'day'))
    with pytest.raises(FileNotFoundError):
        open_dir(os.path.join(root, 'missing'), [root])


@pytest.mark.parametrize('where', ['middle', 'last'])
def test_a_folder_swapped_for_a_link_is_refused(tree, where):
    root, outside = tree
    target = os.path.join(root, 'a') if where == 'middle' else os.path.join(root, 'a', 'b')
    os.rename(target, target + '.moved')
    os.symlink(outside, target)
    with pytest.raises(OSError) as info:
        open_dir(os.path.join(root, 'a', 'b'), [root], create=True)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(OSError):
        open_parent(os.path.join(root, 'a', 'b', 'secret.wav'), [root])
    assert os.listdir(outside) == ['secret.wav']


def test_a_file_that_is_a_link_is_not_opened_nor_followed_on_unlink(tree):
    root, outside = tree
    secret = os.path.join(outside, 'secret.wav')
    os.symlink(secret, os.path.join(root, 'a', 'link.wav'))
    with open_dir(os.path.join(root, 'a'), [root]) as d:
        with pytest.raises(OSError) as info:
            d.open('link.wav')
        assert info.value.errno == errno.ELOOP
        with pytest.raises(Outside):
            d.open('../x')
        assert d.unlink('link.wav')         # the link, not its target
    assert open(secret, 'rb').read() == b'secret'


def test_temp_replace_unlink_expect_and_move(tree):
    root, _ = tree
    with open_dir(os.path.join(root, 'a'), [root]) as a, a.sub('b') as b:
        fd, tmp = a.create_temp('out.wav')
        assert tmp == '.out.wav.%d.tmp' % os.getpid()
        os.write(fd, b'new')
        os.close(fd)
        a.replace(tmp, 'out.wav')
        st = b.stat('f.wav')
        assert not a.unlink('out.wav', expect=st)       # another file: left alone
        assert a.stat('out.wav') is not None
        b.move('f.wav', a, 'moved.wav', expect=st)
        assert a.is_same('moved.wav', st) and b.stat('f.wav') is None
        with pytest.raises(Outside):
            a.sub('..')


def test_remove_temps_by_pid_and_age(tree):
    root, _ = tree
    with open_dir(root, [root]) as d:
        for name in ('.x.wav.111.tmp', '.x.mp3.111.tmp', '.x.wav.222.tmp', 'x.wav', '.keep'):
            os.close(d.open(name, os.O_WRONLY | os.O_CREAT))
        assert remove_temps(d, pids={111}) == 2
        assert remove_temps(d, older_than=time.time() - 3600) == 0
        assert remove_temps(d, older_than=time.time() + 1) == 1
        assert sorted(os.listdir(root)) == ['.keep', 'a', 'x.wav']


def test_temp_name_pattern():
    m = _safepath.TEMP_RE.match(_safepath.temp_name('20260101_000000_000001_A.wav', 42))
    assert m.group(1) == '20260101_000000_000001_A.wav' and m.group(2) == '42'


def test_resolved_takes_links_inside_the_roots_only(tree):
    root, outside = tree
    os.symlink(os.path.join(root, 'a'), os.path.join(root, 'inlink'))
    os.symlink(outside, os.path.join(root, 'outlink'))
    with _safepath.open_dir_resolved(os.path.join(root, 'inlink', 'b'), [root]) as d:
        assert d.path == os.path.join(root, 'a', 'b')
    with pytest.raises(Outside):
        _safepath.open_dir_resolved(os.path.join(root, 'outlink'), [root])
    folder, name = _safepath.open_parent_resolved(os.path.join(root, 'inlink', 'b', 'f.wav'), [root])
    with folder:
        assert name == 'f.wav' and folder.stat(name) is not None


def test_text_replaces_undecodable_bytes():
    assert _safepath.text(os.fsdecode(b'/x/caf\xe9')) == '/x/caf\ufffd'
    assert _safepath.text('/x/café') == '/x/café'


def test_an_output_named_like_its_source_is_kept(tmp_path):
    import shutil
    from _audio import prepare
    src = tmp_path / 'sid.wav'
    shutil.copy(os.path.join(os.path.dirname(__file__), 'fixtures', 'en_hello.wav'), src)
    before = src.read_bytes()
    fd = os.open(src, os.O_RDONLY)
    try:
        prepared = prepare('/proc/self/fd/%d' % fd, 16000, str(tmp_path), 'sid', source_stat=os.fstat(fd))
    finally:
        os.close(fd)
    assert prepared.kept == ['sid.wav'] and prepared.audio_wav == 'sid.wav'
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['sid.wav']      # no temp left either


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of its own (we run as root), unmounted at the end."""
    import subprocess
    mnt = tmp_path / 'tmpfs'
    mnt.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mnt)], check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(['umount', '-l', str(mnt)], check=True)


def test_move_across_file_systems_copies_then_removes(tree, tmpfs):
    root, _ = tree
    with open_dir(os.path.join(root, 'a', 'b'), [root]) as src, _safepath.open_root(tmpfs) as dest:
        st = src.stat('f.wav')
        src.move('f.wav', dest, 'f.wav', expect=st)
        assert src.stat('f.wav') is None
        fd = dest.open('f.wav')
        assert os.read(fd, 10) == b'data'
        os.close(fd)
    assert os.listdir(tmpfs) == ['f.wav']         # no temp left behind
