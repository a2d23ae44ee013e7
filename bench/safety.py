"""What the record and strict-JSON promises cost, measured in one run against the old way:

- records: RecordsFile (each line written with os.write, fsync'd alone or, as the reporter
  does with what queued meanwhile, 32 to a fsync; the file checked for removal) against
  2.0's buffered append + flush without fsync, in a folder on the disk of --dir (default:
  this tree's bench/out), records/s and the ratios;
- request parsing: _packet.decode_json (strict: no NaN/Infinity, depth checked) against plain
  json.loads, for a typical 1002 body and for a 200 KB body of 50,000 numbers.

Usage: .venv/bin/python bench/safety.py [--records 2000] [--dir PATH]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _packet  # noqa: E402
from _records import FINAL, RecordsFile, TaskRecord  # noqa: E402
from _states import Mark, Result, Source, State  # noqa: E402


def record(i):
    now = time.time()
    return TaskRecord(speech_id='bench-%06d' % i, source=Source.CLIENT, state=State.DONE, result=Result.OK,
                      created=now, ended=now + 1, marks=[(Mark.TRANSCRIBE_START, 0.0), (Mark.TRANSCRIBE_END, 1.0)],
                      request={'fileID': 'call-%d.wav' % i, 'filePath': '/data/batch', 'domainCode': 'SG0001'},
                      transcript='hello customer how can i help you', duration=2.4, worker=1, seq=i)


def old_way(folder, records):
    """2.0's RecordsFile: buffered text append, flush, no fsync."""
    with open(os.path.join(folder, time.strftime('%Y%m%d') + '.json'), 'a', encoding='utf-8') as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_line(), ensure_ascii=False, separators=(', ', ': ')) + '\n')
            fh.flush()


def new_way(folder, records, batch=1):
    """RecordsFile as the reporter drives it: `batch` records queued together share one fsync."""
    sink = RecordsFile(folder)
    for i, rec in enumerate(records, 1):
        sink.handle(FINAL, rec)
        if i % batch == 0:
            sink.commit()
    sink.commit()
    sink.close()


def new_batched(folder, records):
    return new_way(folder, records, 32)


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_records(base, n):
    records = [record(i) for i in range(n)]
    out = {}
    for name, fn in (('old (flush, no fsync)', old_way), ('new, fsync each line', new_way),
                     ('new, 32 lines a fsync', new_batched)):
        folder = tempfile.mkdtemp(prefix='records-', dir=base)
        try:
            out[name] = timed(fn, folder, records)
        finally:
            shutil.rmtree(folder)
    for name, secs in out.items():
        print('records %-24s %6d lines in %7.3f s: %9.0f records/s, %7.1f us each' % (name, n, secs, n / secs,
                                                                                      secs / n * 1e6))
    old, new, batched = out.values()
    print('records time per line, new/old: %.1f one by one (an idle daemon), %.1f in rounds of 32 (under load)'
          % (new / old, batched / old))


def bench_parse(rounds):
    small = json.dumps({'speechID': '20210125_112014_082971', 'domainName': 'SGDefault', 'domainCode': 'SG0001',
                        'fileID': 'a.wav', 'fileName': 'call-0001.wav', 'filePath': '/data/batch',
                        'score': 0.75}).encode()
    big = json.dumps({'filePath': '/x', 'fileID': 'a', 'numbers': [i * 0.5 for i in range(50000)]}).encode()
    for label, body, n in (('typical 1002 (%d B)' % len(small), small, rounds),
                           ('50,000 floats (%d KB)' % (len(big) // 1024), big, max(1, rounds // 2000))):
        plain = timed(lambda: [json.loads(body.decode('utf-8')) for _ in range(n)])
        strict = timed(lambda: [_packet.decode_json(1002, body) for _ in range(n)])
        print('parse %-24s json.loads %8.1f us, decode_json %8.1f us, ratio %.2f'
              % (label, plain / n * 1e6, strict / n * 1e6, strict / plain))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--records', type=int, default=2000)
    ap.add_argument('--rounds', type=int, default=20000)
    ap.add_argument('--dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'out'))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print('records folder on: %s' % args.dir)
    bench_records(args.dir, args.records)
    bench_parse(args.rounds)


if __name__ == '__main__':
    main()
