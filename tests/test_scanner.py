"""Tests of the drop-folder scanner: the walk, settle, claim, recovery and move-out logic
on their own, then the real daemon taking dropped files exactly once, through slow
writers, broken files, SIGTERM, SIGKILL of the master and of the scanner."""
import collections
import datetime
import json
import os
import shutil
import signal
import socket
import time

import psutil
import pytest

import _config
import _scanner
from conftest import FIXTURES, expected_texts, long_wav, title_of, wait_for

TEXTS = expected_texts()
EN = sorted(n for n in os.listdir(FIXTURES) if n.startswith('en_') and n.endswith('.wav'))


# ================================================================== units, no daemon

def touch(path, data=b'x' * 100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)
    return path


def test_walker_takes_audio_files_only_and_skips_working_folders(tmp_path):
    root = tmp_path / 'batch'
    want = [touch(str(root / 'a.wav')), touch(str(root / 'B.MP3')), touch(str(root / 'sub' / 'deep' / 'c.flac'))]
    for name in ('.hidden.wav', 'x.wav.part', 'y.tmp', '~lock.wav', 'notes.txt', 'wav', 'noext',
                 'sub/.h.wav', 'rec_mp3/20240101/out.wav', 'done/kept.wav', '.git/obj.wav'):
        touch(str(root / name))
    touch(str(root / '.processing' / '20240101_000000_000001__p.wav'))
    os.symlink(want[0], str(root / 'link.wav'))
    os.symlink(str(root / 'sub'), str(root / 'linkdir'))
    os.mkfifo(str(root / 'fifo.wav'))
    walker = _scanner.Walker(str(root), [str(root / 'rec_mp3'), str(root / 'done')],
                             ['*.part', '*.tmp', '~*'], ['wav', 'mp3', 'flac'])
    files, processing = walker.walk()
    assert sorted(f[0] for f in files) == sorted(want)
    assert processing == [str(root / '.processing')]
    assert all(size == 100 for _, size, _, _ in files)


def test_settler_takes_a_file_only_after_one_unchanged_pass():
    s = _scanner.Settler()
    assert s.update([('/a', 10, 1, 7), ('/e', 0, 1, 8)]) == ([], 1, 1)
    # unchanged -> settled; the empty file never settles
    assert s.update([('/a', 10, 1, 7), ('/e', 0, 1, 8)]) == (['/a'], 0, 1)
    # growing: a new size (or mtime, or inode) restarts the wait
    for sig in ((11, 1, 7), (11, 2, 7), (11, 2, 9)):
        assert s.update([('/a',) + sig]) == ([], 1, 0)
    assert s.update([('/a', 11, 2, 9)]) == (['/a'], 0, 0)
    # a vanished file is forgotten: back again, it waits one more pass
    s.update([])
    assert s.update([('/a', 11, 2, 9)]) == ([], 1, 0)
    # oldest first
    s.update([('/n', 5, 20, 1), ('/o', 5, 10, 2)])
    assert s.update([('/n', 5, 20, 1), ('/o', 5, 10, 2)])[0] == ['/o', '/n']


class Master:
    """The master's side of the scanner's socket, for the unit tests."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(5)
        self.buf = b''

    def messages(self):
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                self.buf += data
        except BlockingIOError:
            pass
        lines = self.buf.split(b'\n')
        self.buf = lines.pop()
        return [json.loads(line) for line in lines]

    def submits(self):
        return [m[1] for m in self.messages() if m[0] == 'submit']


def make_scanner(tmp_path, source_after='delete', workers=1, extra=''):
    ini = tmp_path / 'app.ini'
    ini.write_text('[setting]\nworker_processes = %d\n[task]\nsource_after = %s\n'
                   '[directory]\nscan_interval_secs = 0.1\n%s' % (workers, source_after, extra))
    cfg = _config.load(str(ini))
    os.makedirs(cfg['directory']['audio_source_path'], exist_ok=True)
    ours, theirs = socket.socketpair()
    scanner = _scanner.Scanner(ours, cfg, os.getpid())
    scanner.engine = True
    return scanner, Master(theirs), str(tmp_path / 'batch')


def test_claim_submit_limit_and_moving_out(tmp_path):
    sc, master, batch = make_scanner(tmp_path, workers=1)
    for i in range(5):
        touch(os.path.join(batch, 'f%d.wav' % i))
    sc.scan()
    assert sc.counts['claimedTotal'] == 0               # seen once: not settled yet
    sc.scan()
    assert sc.counts['claimedTotal'] == 5
    assert os.listdir(batch) == ['.processing']
    sc.submit()
    reqs = master.submits()
    assert len(reqs) == sc.limit == 2                  # 2 per worker at most
    req = reqs[0]
    assert req['filePath'] == os.path.join(batch, '.processing')
    assert req['fileID'] == '%s__%s' % (req['speechID'], req['fileName'])
    assert req['fileName'] == 'f0.wav' and (req['domainCode'], req['domainName']) == ('SG0001', 'SGDefault')
    assert os.path.isfile(os.path.join(req['filePath'], req['fileID']))
    # success: deleted (source_after = delete); failure: error_backup_path with the reason
    sc.handle(['ended', reqs[0]['speechID'], '0', 'DONE', ''])
    sc.handle(['ended', reqs[1]['speechID'], '9', 'UNKNOWN_FORMAT', 'cannot open it as audio'])
    assert not os.path.exists(os.path.join(req['filePath'], req['fileID']))
    error = str(tmp_path / 'error')
    assert sorted(os.listdir(error)) == ['f1.wav', 'f1.wav.reason']
    reason = open(os.path.join(error, 'f1.wav.reason')).read()
    assert 'cannot open it as audio' in reason and 'result=9' in reason and reqs[1]['speechID'] in reason
    sc.submit()
    reqs = master.submits()
    assert [r['fileName'] for r in reqs] == ['f2.wav', 'f3.wav']
    # busy (6): stays claimed and goes again, first, after a pause
    sc.handle(['rejected', reqs[0]['speechID'], '6', 'max_tasks'])
    sc.submit()
    assert master.submits() == []
    sc.hold_until = 0
    sc.submit()
    assert [r['fileName'] for r in master.submits()] == ['f2.wav']
    # the speechID taken by a client task (1): a new speechID, same file
    sc.handle(['rejected', reqs[1]['speechID'], '1', 'already in progress'])
    sc.submit()
    again = master.submits()
    assert [r['fileName'] for r in again] == ['f3.wav'] and again[0]['speechID'] != reqs[1]['speechID']
    assert os.path.isfile(os.path.join(again[0]['filePath'], again[0]['fileID']))
    # refused for good (7): error_backup_path, never submitted again
    sc.handle(['rejected', again[0]['speechID'], '7', 'outside the allowed roots'])
    assert 'outside the allowed roots' in open(os.path.join(error, 'f3.wav.reason')).read()
    assert sc.counts['done'] == 1 and sc.counts['failed'] == 2
    # an end for a speechID the scanner no longer holds is ignored
    sc.handle(['ended', reqs[1]['speechID'], '0', 'DONE', ''])


def test_keep_moves_to_done_keeping_the_subfolder_and_never_overwrites(tmp_path):
    sc, master, batch = make_scanner(tmp_path, source_after='keep', workers=4,
                                     extra='domain_from_folder = true\n')
    touch(os.path.join(batch, 'SG0002', 'day', 'a.wav'), b'1' * 10)
    touch(os.path.join(batch, 'top.wav'), b'2' * 10)
    touch(str(tmp_path / 'batch' / 'done' / 'SG0002' / 'day' / 'a.wav'), b'old')
    sc.scan()
    sc.scan()
    sc.submit()
    reqs = {r['fileName']: r for r in master.submits()}
    assert reqs['a.wav']['domainCode'] == 'SG0002' and reqs['top.wav']['domainCode'] == 'SG0001'
    for r in reqs.values():
        sc.handle(['ended', r['speechID'], '0', 'DONE', ''])
    done = tmp_path / 'batch' / 'done'
    assert (done / 'top.wav').read_bytes() == b'2' * 10
    assert (done / 'SG0002' / 'day' / 'a.wav').read_bytes() == b'old'
    assert (done / 'SG0002' / 'day' / ('%s_a.wav' % reqs['a.wav']['speechID'])).read_bytes() == b'1' * 10
    # the done folder lies inside the drop folder: never taken again; empty .processing folders are removed
    for _ in range(3):
        sc.scan()
    assert master.submits() == [] and sc.counts['claimedTotal'] == 2
    assert not os.path.exists(os.path.join(batch, '.processing'))


def test_paused_without_engine_and_many_ids_in_one_microsecond(tmp_path):
    sc, master, batch = make_scanner(tmp_path, workers=64)
    for i in range(2000):
        touch(os.path.join(batch, 'f%04d.wav' % i), b'x')
    sc.engine = False
    sc.scan()
    sc.scan()
    assert sc.counts['claimedTotal'] == 0 and sc.last['waiting'] == 0     # settled, held back
    sc.submit()
    assert master.submits() == []
    sc.engine = True
    sc.scan()
    names = os.listdir(os.path.join(batch, '.processing'))
    sids = [n.split('__')[0] for n in names]
    assert len(names) == 2000 and len(set(sids)) == 2000
    assert all(_scanner.CLAIMED_RE.match(n) for n in names)


def test_a_name_that_is_not_utf8_is_claimed_under_a_utf8_name(tmp_path):
    sc, master, batch = make_scanner(tmp_path)
    with open(os.path.join(os.fsencode(batch), b'caf\xe9.wav'), 'wb') as f:
        f.write(b'x')
    sc.scan()
    sc.scan()
    sc.submit()
    (req,) = master.submits()
    assert req['fileName'] == 'caf\ufffd.wav'
    assert os.path.isfile(os.path.join(req['filePath'], req['fileID']))
    json.dumps(req, ensure_ascii=False).encode('utf-8')


def write_record(folder, sid, result, source='scanner', day=None):
    os.makedirs(folder, exist_ok=True)
    day = day or sid[:8]
    rec = {'data': {'speechID': sid, 'transcript': '', 'result': result}, 'state': 'DONE' if result == '0' else 'ERROR',
           'source': source, 'message': 'it failed' if result != '0' else None}
    with open(os.path.join(folder, day + '.json'), 'a', encoding='utf-8') as f:
        f.write(json.dumps(rec) + '\n')


def test_recovery_finishes_recorded_files_and_submits_the_rest_first(tmp_path):
    sc, master, batch = make_scanner(tmp_path, workers=8)
    proc = os.path.join(batch, 'sub', '.processing')
    ids = ['20240102_030405_000001', '20240102_030405_000002', '20240102_030405_000003', '20240102_030405_000004']
    for sid in ids:
        touch(os.path.join(proc, '%s__call-%s.wav' % (sid, sid[-1])))
    touch(os.path.join(proc, 'stray.wav'))
    records = str(tmp_path / 'records')
    write_record(records, ids[0], '0')                         # recorded: deleted, not run again
    write_record(records, ids[1], '9', day='20240103')         # recorded failed, a day later
    write_record(records, ids[2], '0', source='client')        # a client's task with the same id: not ours
    with open(os.path.join(records, '20240102.json'), 'a') as f:
        f.write('{"data": {"speechID": "%s", "result": "0"' % ids[3])  # cut short by a crash
    touch(os.path.join(batch, 'new.wav'))
    sc.scan()                                                  # first pass: recovery
    assert sc.counts['recovered'] == 4
    assert sorted(os.listdir(proc)) == ['%s__call-%s.wav' % (s, s[-1]) for s in ids[2:]] + ['stray.wav']
    assert open(str(tmp_path / 'error' / 'sub' / 'call-2.wav.reason')).read().startswith('it failed')
    sc.scan()
    sc.submit()
    reqs = master.submits()
    assert [r['speechID'] for r in reqs[:2]] == ids[2:]        # the same speechIDs, before new files
    assert reqs[0]['fileName'] == 'call-3.wav' and reqs[0]['filePath'] == proc
    assert reqs[2]['fileName'] == 'new.wav' and reqs[2]['speechID'] > ids[-1]


def test_recorded_outcomes_reads_only_days_from_the_claim_on(tmp_path):
    folder = str(tmp_path)
    write_record(folder, '20240105_000000_000001', '0')
    write_record(folder, '20240105_000000_000002', '5', day='20240101')     # before the claim: not read
    write_record(folder, '20240105_000000_000003', '9', day='20240104')     # a day early: read (time zones)
    found = _scanner.recorded_outcomes(folder, ['20240105_000000_000001', '20240105_000000_000002',
                                                '20240105_000000_000003', '20240105_000000_000009'])
    assert found == {'20240105_000000_000001': ('0', 'DONE', ''),
                     '20240105_000000_000003': ('9', 'ERROR', 'it failed')}


@pytest.mark.parametrize('section, line', [('directory', 'audio_target_path = batch'),
                                           ('directory', 'scan_done_path = .'),
                                           ('task', 'error_backup_path = batch')])
def test_working_folders_may_not_be_the_scanned_folder(tmp_path, section, line):
    ini = tmp_path / 'app.ini'
    for enabled in ('true', 'false'):
        text = '[task]\n%s\n[directory]\nscan_enabled = %s\n%s\n' % (
            line if section == 'task' else '', enabled, line if section == 'directory' else '')
        ini.write_text(text)
        if enabled == 'false':
            _config.load(str(ini))                  # no scanner, no loop
            continue
        with pytest.raises(_config.ConfigError) as err:
            _config.load(str(ini))
        assert 'must not be audio_source_path or a folder above it' in str(err.value)


# ================================================================== the real daemon

def scanning(make_daemon, interval=0.3, extra='', **opts):
    """A daemon with the scanner on, every `interval` seconds."""
    d = make_daemon(**opts)
    with open(d.ini) as f:
        text = f.read()
    assert 'scan_enabled = false' in text and 'scan_interval_secs = 1\n' in text
    text = text.replace('scan_enabled = false', 'scan_enabled = true\n' + extra) \
        .replace('scan_interval_secs = 1\n', 'scan_interval_secs = %s\n' % interval)
    with open(d.ini, 'w') as f:
        f.write(text)
    d.interval = interval
    return d


def drop(d, fixture, name, folder=None):
    """Copy a fixture into the drop folder the way a recorder should: written aside, renamed in."""
    folder = folder or d.batch
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, name + '.part')
    shutil.copy(os.path.join(FIXTURES, fixture), tmp)
    os.rename(tmp, os.path.join(folder, name))
    return os.path.join(folder, name)


def monitor(d):
    c = d.client()
    try:
        c.send(1003, {'type': 'all'})
        return c.recv(10)[1]
    finally:
        c.close()


def scanner_proc(d):
    for p in d.processes()[1:]:
        try:
            if title_of(p).startswith('svcmgr: scanner'):
                return p
        except psutil.NoSuchProcess:
            pass
    return None


def claimed(d):
    """Names of the files in every .processing folder."""
    out = []
    for folder, dirs, files in os.walk(d.batch):
        if os.path.basename(folder) == '.processing':
            out += files
    return sorted(out)


def passes(d, n):
    """Wait until the scanner has made `n` more passes."""
    start = monitor(d)['scanner'].get('scans', 0)
    wait_for(lambda: monitor(d)['scanner'].get('scans', 0) >= start + n, 30, '%d scanner passes' % n)


def by_name(records):
    out = collections.defaultdict(list)
    for r in records:
        out[r['request']['fileName']].append(r)
    return out


def test_fifty_files_dropped_at_once_end_with_one_record_each(make_daemon):
    d = scanning(make_daemon, workers=2).start()
    files = {}
    for i in range(50):
        fixture = EN[i % len(EN)]
        name = 'call-%02d-%s' % (i, fixture)
        files[name] = fixture
        shutil.copy(os.path.join(FIXTURES, fixture), os.path.join(d.batch, name + '.tmp'))
    for name in files:
        os.rename(os.path.join(d.batch, name + '.tmp'), os.path.join(d.batch, name))
    body = wait_for(lambda: (lambda m: m if m['scanner'].get('inProgress') else None)(monitor(d)), 30, 'work')
    s = body['scanner']
    assert s['enabled'] and s['alive'] and s['pid'] == scanner_proc(d).pid and s['lastScan']
    assert s['inProgress'] <= 4                                 # 2 workers: never more than 2 each
    recs = d.wait_records(50, timeout=300)
    wait_for(lambda: not claimed(d), 30, '.processing emptied')
    named = by_name(recs)
    assert len(recs) == 50 and len({r['data']['speechID'] for r in recs}) == 50
    assert sorted(named) == sorted(files)
    for name, fixture in files.items():
        (rec,) = named[name]
        assert rec['source'] == 'scanner' and rec['data']['result'] == '0', rec
        assert rec['data']['transcript'] == TEXTS[fixture], name
        assert rec['request']['domainCode'] == 'SG0001' and rec['request']['domainName'] == 'SGDefault'
        assert os.path.isfile(os.path.join(d.batch, 'rec_mp3', rec['data']['speechID'][:8],
                                           rec['data']['speechID'] + '.wav'))
    # source_after = keep: every source in done/, none left to be taken again
    assert sorted(os.listdir(os.path.join(d.batch, 'done'))) == sorted(files)
    assert sorted(os.listdir(d.batch)) == ['done', 'rec_mp3']
    counts = ('claimedTotal', 'done', 'failed', 'inProgress', 'claimed', 'inFlight')
    wait_for(lambda: tuple(monitor(d)['scanner'][k] for k in counts) == (50, 50, 0, 0, 0, 0), 10, 'final status')


def test_a_file_written_slowly_is_taken_only_after_it_stops_growing(make_daemon):
    d = scanning(make_daemon, interval=1.0, workers=1).start()
    data = open(os.path.join(FIXTURES, 'en_account.wav'), 'rb').read()
    path = os.path.join(d.batch, 'slow.wav')
    chunks = 10
    step = len(data) // chunks + 1
    with open(path, 'wb') as f:
        for i in range(chunks):
            f.write(data[i * step:(i + 1) * step])
            f.flush()
            last_write = datetime.datetime.now()
            time.sleep(0.5)                 # 10 x 0.5 s: five scan intervals of growth
            assert os.path.exists(path), 'taken while still growing (chunk %d)' % i
            assert not claimed(d) and not d.records()
    assert monitor(d)['scanner']['waiting'] == 1
    (rec,) = d.wait_records(1, timeout=60)
    assert rec['data']['transcript'] == TEXTS['en_account.wav'] and rec['request']['fileName'] == 'slow.wav'
    claimed_at = datetime.datetime.strptime(rec['data']['speechID'], '%Y%m%d_%H%M%S_%f')
    assert (claimed_at - last_write).total_seconds() >= 0.9 * d.interval
    # The file leaves the drop folder only once its record is on disk: a moment after it.
    done = os.path.join(d.batch, 'done', 'slow.wav')
    wait_for(lambda: os.path.exists(done), 30, 'slow.wav moved into done/')
    assert open(done, 'rb').read() == data


def test_empty_hidden_temporary_and_other_files_are_left_alone(make_daemon):
    d = scanning(make_daemon).start()
    left = ['empty.wav', '.hidden.wav', 'copying.wav.part', 'x.tmp', '~lock.wav', 'notes.txt', 'sub/.h.wav']
    for name in left:
        touch(os.path.join(d.batch, name), b'' if name == 'empty.wav' else open(
            os.path.join(FIXTURES, 'en_hello.wav'), 'rb').read())
    os.symlink(os.path.join(FIXTURES, 'en_hello.wav'), os.path.join(d.batch, 'link.wav'))
    drop(d, 'en_morning.wav', 'good.wav')
    (rec,) = d.wait_records(1)
    assert rec['data']['transcript'] == TEXTS['en_morning.wav']
    passes(d, 3)
    assert len(d.records()) == 1
    for name in left + ['link.wav']:
        assert os.path.lexists(os.path.join(d.batch, name)), name
    s = monitor(d)['scanner']
    assert s['empty'] == 1 and s['filesSeen'] == 1 and s['claimedTotal'] == 1
    # an empty file is watched, not given up: once it has content and settles, it is taken
    shutil.copy(os.path.join(FIXTURES, 'en_hello.wav'), os.path.join(d.batch, 'empty.wav'))
    recs = d.wait_records(2)
    assert by_name(recs)['empty.wav'][0]['data']['transcript'] == TEXTS['en_hello.wav']


def test_a_broken_file_lands_in_error_backup_with_its_reason_once(make_daemon):
    d = scanning(make_daemon).start()
    junk = os.urandom(5000)
    touch(os.path.join(d.batch, 'broken.wav'), junk)
    (rec,) = d.wait_records(1)
    assert rec['data']['result'] == '9' and rec['state'] == 'UNKNOWN_FORMAT'
    error = os.path.join(d.base, 'error')
    wait_for(lambda: os.path.exists(os.path.join(error, 'broken.wav')), 10, 'the file in error/')
    assert open(os.path.join(error, 'broken.wav'), 'rb').read() == junk
    reason = open(os.path.join(error, 'broken.wav.reason'), encoding='utf-8').read()
    assert rec['message'] in reason and 'result=9' in reason and rec['data']['speechID'] in reason
    passes(d, 3)                            # never retried
    assert len(d.records()) == 1 and not claimed(d) and not os.path.exists(os.path.join(d.batch, 'broken.wav'))
    assert monitor(d)['scanner']['failed'] == 1


def test_a_second_file_with_the_same_name_later_is_a_new_task(make_daemon):
    d = scanning(make_daemon, source_after='delete').start()
    drop(d, 'en_hello.wav', 'call.wav')
    (first,) = d.wait_records(1)
    wait_for(lambda: not claimed(d) and not os.path.exists(os.path.join(d.batch, 'call.wav')), 10, 'deleted')
    drop(d, 'en_morning.wav', 'call.wav')
    recs = d.wait_records(2)
    second = next(r for r in recs if r['data']['speechID'] != first['data']['speechID'])
    assert first['data']['transcript'] == TEXTS['en_hello.wav']
    assert second['data']['transcript'] == TEXTS['en_morning.wav'] and second['request']['fileName'] == 'call.wav'
    wait_for(lambda: sorted(os.listdir(d.batch)) == ['rec_mp3'], 10, 'the second file deleted')


def test_domain_from_the_first_folder_level(make_daemon):
    d = scanning(make_daemon, extra='domain_from_folder = true').start()
    drop(d, 'en_hello.wav', 'a.wav', os.path.join(d.batch, 'SG0077', '2024'))
    drop(d, 'en_morning.wav', 'b.wav')
    named = by_name(d.wait_records(2))
    assert named['a.wav'][0]['request']['domainCode'] == 'SG0077'
    assert named['b.wav'][0]['request']['domainCode'] == 'SG0001'
    wait_for(lambda: os.path.exists(os.path.join(d.batch, 'done', 'SG0077', '2024', 'a.wav')), 10, 'kept')


def wait_gone(procs, timeout=30):
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, alive


def test_sigkill_of_the_master_with_files_in_processing_finishes_each_once(make_daemon):
    d = scanning(make_daemon, workers=1).start()
    files = {}
    for i, fixture in enumerate(EN[:8]):
        name = 'k%d-%s' % (i, fixture)
        files[name] = fixture
        drop(d, fixture, name)
    wait_for(lambda: not [n for n in os.listdir(d.batch) if n.endswith('.wav')] and d.records(), 60,
             'all claimed and one recorded')
    # The worst moment: tasks recorded but their files not yet moved out. Freezing the
    # scanner holds it there while the master records what it has in flight.
    scanner = scanner_proc(d)
    scanner.suspend()
    before = len(d.records())
    wait_for(lambda: len(d.records()) > before, 60, 'a record the scanner was not told of')
    recorded = {r['data']['speechID'] for r in d.records()}
    left = {n.split('__')[0]: n.split('__')[1] for n in claimed(d)}
    assert recorded & set(left), 'no recorded file left in .processing'
    procs = d.processes()
    os.kill(d.pid, signal.SIGKILL)
    wait_gone(procs)
    d.start()
    recs = d.wait_records(8, timeout=180)
    wait_for(lambda: not claimed(d), 30, '.processing emptied')
    passes(d, 2)
    recs = d.records()
    named = by_name(recs)
    assert len(recs) == 8 and sorted(named) == sorted(files)
    for name, fixture in files.items():
        (rec,) = named[name]
        assert rec['data']['result'] == '0' and rec['data']['transcript'] == TEXTS[fixture]
    # what was claimed before the kill kept its speechID
    assert left == {r['data']['speechID']: r['request']['fileName'] for r in recs if r['data']['speechID'] in left}
    assert 'already recorded' in d.log_text()
    assert sorted(os.listdir(os.path.join(d.batch, 'done'))) == sorted(files)


def test_sigterm_leaves_claimed_files_for_the_next_start(make_daemon):
    d = scanning(make_daemon, workers=1, graceful=30).start()
    for i in range(5):
        long_wav(os.path.join(d.batch, 'long%d.wav.part' % i), 3)
        os.rename(os.path.join(d.batch, 'long%d.wav.part' % i), os.path.join(d.batch, 'long%d.wav' % i))
    wait_for(lambda: any(w['speechID'] for w in monitor(d)['workers']), 60, 'a worker busy')
    procs = d.processes()
    os.kill(d.pid, signal.SIGTERM)
    wait_gone(procs, 60)
    assert 'Program End' in d.psout()
    first = d.records()
    assert first and all(r['data']['result'] == '0' for r in first)    # no result 3 for scanned files
    assert len(claimed(d)) == 5                     # the finished ones too: moved at the next start
    d.start()
    d.wait_records(5, timeout=180)
    wait_for(lambda: not claimed(d), 30, '.processing emptied')
    recs = d.records()
    assert sorted(by_name(recs)) == ['long%d.wav' % i for i in range(5)]
    assert len(recs) == 5 and all(r['data']['result'] == '0' for r in recs)


def test_the_scanner_killed_alone_is_replaced_and_nothing_runs_twice(make_daemon):
    d = scanning(make_daemon, workers=1).start()
    for i, fixture in enumerate(EN[:4]):
        drop(d, fixture, 'r%d-%s' % (i, fixture))
    wait_for(lambda: monitor(d)['scanner'].get('inProgress'), 30, 'tasks in flight')
    old = scanner_proc(d)
    old.kill()
    new = wait_for(lambda: (lambda p: p if p and p.pid != old.pid else None)(scanner_proc(d)), 30, 'a new scanner')
    recs = d.wait_records(4, timeout=120)
    wait_for(lambda: not claimed(d), 30, '.processing emptied')
    passes(d, 2)
    recs = d.records()
    assert len(recs) == 4 and len({r['data']['speechID'] for r in recs}) == 4
    assert all(len(v) == 1 for v in by_name(recs).values())
    s = monitor(d)['scanner']
    assert s['restarts'] == 1 and s['pid'] == new.pid
    assert 'scanner (pid %d) died' % old.pid in d.log_text()
