"""Tests of the drop folder's inotify fast path (_watch.py): the watcher's events and the
quick settling rule on their own, then the real daemon with scans 10 minutes apart
taking a copied file without waiting for a scan, and never a file still open for writing."""
import os
import select
import shutil

import _watch
from conftest import FIXTURES, expected_texts, wait_for
from helpers import monitor

TEXTS = expected_texts()


def events(w, want, timeout=5):
    """Read the watcher until `want` (kind, path) is among its events."""
    seen = []

    def got():
        ready, _, _ = select.select([w], [], [], 0.1)
        if ready:
            seen.extend(w.read())
        return want in seen
    wait_for(got, timeout, '%s in %s' % (want, seen))
    return seen


# ================================================================== units, no daemon

def test_watcher_reports_writes_closes_moves_and_new_folders(tmp_path):
    root = tmp_path / 'batch'
    (root / 'rec_mp3').mkdir(parents=True)
    (root / 'old').mkdir()
    w = _watch.Watcher(str(root), skip=[str(root / 'rec_mp3')])
    assert w.start()
    try:
        assert sorted(w.paths.values()) == [str(root), str(root / 'old')]     # skip folder not watched
        path = str(root / 'a.wav')
        f = open(path, 'wb')
        f.write(b'x' * 100)
        f.flush()
        seen = events(w, (_watch.CHANGING, path))
        assert (_watch.WRITTEN, path) not in seen                               # still open
        f.close()
        events(w, (_watch.WRITTEN, path))
        (tmp_path / 'm.wav').write_bytes(b'y' * 10)
        os.rename(str(tmp_path / 'm.wav'), str(root / 'old' / 'm.wav'))        # moved in, a subfolder
        events(w, (_watch.WRITTEN, str(root / 'old' / 'm.wav')))
        os.makedirs(str(root / 'new' / 'deep'))
        events(w, (_watch.NEWDIR, str(root / 'new')))
        assert str(root / 'new' / 'deep') in w.paths.values()
        (root / 'new' / 'deep' / 'b.wav').write_bytes(b'z')
        events(w, (_watch.WRITTEN, str(root / 'new' / 'deep' / 'b.wav')))
        (root / 'rec_mp3' / 'out.wav').write_bytes(b'z')                       # the skip folder: silent
        (root / '.processing').mkdir()
        (root / '.processing' / 'c.wav').write_bytes(b'z')
        (root / 'last.wav').write_bytes(b'z')
        seen = events(w, (_watch.WRITTEN, str(root / 'last.wav')))
        assert not [p for _, p in seen if 'rec_mp3' in p or '.processing' in p], seen
        os.rename(str(root / 'old'), str(tmp_path / 'gone'))                  # moved out: unwatched
        (root / 'z.wav').write_bytes(b'z')                                     # events read past the move
        events(w, (_watch.WRITTEN, str(root / 'z.wav')))
        assert str(root / 'old') not in w.paths.values()
    finally:
        w.close()


def test_quick_settler_waits_for_an_unchanged_closed_file(tmp_path):
    q = _watch.QuickSettler(1.0, lambda name: name.endswith('.wav'))
    a, b, e = str(tmp_path / 'a.wav'), str(tmp_path / 'b.wav'), str(tmp_path / 'e.wav')
    for path, data in ((a, b'1' * 10), (b, b'2' * 10), (e, b'')):
        with open(path, 'wb') as f:
            f.write(data)
    q.note(_watch.WRITTEN, a, now=100.0)
    q.note(_watch.WRITTEN, b, now=100.0)
    q.note(_watch.WRITTEN, e, now=100.0)                        # empty: never quick
    q.note(_watch.WRITTEN, str(tmp_path / 'n.txt'), now=100.0)  # not audio
    assert sorted(q.due) == [a, b] and q.next_due() == 101.0
    assert q.ready(now=100.5) == []                             # not yet
    with open(b, 'ab') as f:
        f.write(b'more')                                        # changed meanwhile: waits again
    assert q.ready(now=101.0) == [a]
    assert list(q.due) == [b] and q.due[b][0] == 102.0
    q.note(_watch.CHANGING, b)                                  # written again: polling decides
    assert q.ready(now=200.0) == [] and not q.due


# ================================================================== the real daemon

def scanning(make_daemon, interval, extra='', **opts):
    """A daemon with the scanner on, every `interval` seconds."""
    d = make_daemon(**opts)
    with open(d.ini) as f:
        text = f.read()
    text = text.replace('scan_enabled = false', 'scan_enabled = true\n' + extra) \
        .replace('scan_interval_secs = 1\n', 'scan_interval_secs = %s\n' % interval)
    with open(d.ini, 'w') as f:
        f.write(text)
    return d


def test_a_copied_file_is_taken_without_waiting_for_a_scan(make_daemon):
    # Scans 10 minutes apart: only the inotify path can take the files within the deadline.
    d = scanning(make_daemon, 600, 'scan_settle_secs = 0.5\n', workers=1).start()
    wait_for(lambda: monitor(d).get('scanner', {}).get('scans', 0) >= 1, 30, 'first pass')
    assert monitor(d)['scanner']['watch'] == 'inotify'
    shutil.copy(os.path.join(FIXTURES, 'en_hello.wav'), d.batch)          # the README's first try
    os.makedirs(os.path.join(d.batch, 'sub'))
    shutil.copy(os.path.join(FIXTURES, 'en_cancel.wav'), os.path.join(d.batch, 'sub'))
    # A scan would need two passes (20 minutes) to call these settled.
    recs = d.wait_records(2, timeout=35)
    assert sorted(r['data']['transcript'] for r in recs) == sorted([TEXTS['en_hello.wav'], TEXTS['en_cancel.wav']])
    wait_for(lambda: monitor(d)['scanner']['quickClaims'] == 2, 10, 'both claims counted as inotify ones')
    assert monitor(d)['scanner']['scans'] == 1
    assert sorted(os.listdir(os.path.join(d.batch, 'done'))) == ['en_hello.wav', 'sub']


def test_a_file_held_open_is_not_taken_until_closed(make_daemon):
    d = scanning(make_daemon, 600, 'scan_settle_secs = 0.3\n', workers=1).start()
    wait_for(lambda: monitor(d).get('scanner', {}).get('scans', 0) >= 1, 30, 'first pass')
    data = open(os.path.join(FIXTURES, 'en_account.wav'), 'rb').read()
    path = os.path.join(d.batch, 'slow.wav')
    half = len(data) // 2
    with open(path, 'wb') as f:
        f.write(data[:half])
        f.flush()
        # Unchanged for many settle times while still open: only a scan interval could take it.
        wait_for(lambda: monitor(d)['scanner'].get('settling') == 0, 10, 'nothing settling')
        stamp = monitor(d)['scanner']['lastScan']
        start = os.times().elapsed
        wait_for(lambda: os.times().elapsed - start > 2.0, 5, '2 s with the file open')
        assert os.path.exists(path) and not d.records()
        assert monitor(d)['scanner']['lastScan'] == stamp
        f.write(data[half:])
    (rec,) = d.wait_records(1, timeout=35)
    assert rec['data']['transcript'] == TEXTS['en_account.wav']
    # The scanner's counters reach Monitor with its next status message, after the record.
    wait_for(lambda: monitor(d)['scanner']['quickClaims'] == 1, 10, 'the claim counted as an inotify one')


def test_poll_mode_takes_files_by_scans_only(make_daemon):
    d = scanning(make_daemon, 0.5, 'scan_watch = poll\n', workers=1).start()
    shutil.copy(os.path.join(FIXTURES, 'en_hello.wav'), d.batch)
    (rec,) = d.wait_records(1, timeout=60)
    assert rec['data']['transcript'] == TEXTS['en_hello.wav']
    s = monitor(d)['scanner']
    assert s['watch'] == 'poll' and s['quickClaims'] == 0 and s['claimedTotal'] == 1
