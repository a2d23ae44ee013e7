#!/usr/bin/env python3
"""Control-plane overhead of the legacy engine bridge, with a scripted engine that
answers every 3001 at once:

- per task, from the daemon's own processInterval stamps (tasks sent one at a time,
  so no queueing is counted): 1002 received -> 3001 sent, minus the worker's audio
  preparation (WORKER_PUT - TRANSCRIBE_START + STT_SEND - WORKER_DONE), and
  4001 received -> 2002 sent (TRANSCRIBE_END - STT_RECV); p50 and p99;
- tasks/s with up to 100 tasks in flight.

Usage: .venv/bin/python bench/engine_bridge.py [--tasks 2000]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import wave

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, HERE)

from conftest import Daemon, transcribe_req  # noqa: E402
from core import pct  # noqa: E402
from legacy_engine import LegacyEngine  # noqa: E402


def marks(rec):
    return {m.split(' < ')[1]: float(m.split(' < ')[0]) for m in rec['processInterval']}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tasks', type=int, default=2000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix='svcmgr-bridge-')
    d = Daemon(tmp, engine='remote', workers=2, max_tasks=args.tasks + 10, timeout=600, mp3='false')
    with wave.open(os.path.join(d.data, 'short.wav'), 'wb') as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b'\x01\x00' * 1600)     # 0.2 s
    d.start()
    try:
        eng = LegacyEngine(d.port, transcript=lambda req: '확인했습니다')
        eng.start()
        c = d.client(timeout=600)
        # one at a time: the stamps then hold no queueing
        n = args.tasks
        for i in range(n):
            c.send(1002, transcribe_req(d.data, 'short.wav', sid='s%d' % i))
            c.recv(60)
        recs = d.wait_records(n, timeout=120)
        inbound, outbound = [], []
        for rec in recs:
            m = marks(rec)
            inbound.append((m['WORKER_PUT'] - m['TRANSCRIBE_START']) + (m['STT_SEND'] - m['WORKER_DONE']))
            outbound.append(m['TRANSCRIBE_END'] - m['STT_RECV'])
        print('%d tasks, one at a time, engine answering at once' % n)
        print('1002 received -> 3001 sent, less audio preparation: p50 %.3f ms, p99 %.3f ms (target p50 < 1, p99 < 5)'
              % (pct(inbound, 50) * 1e3, pct(inbound, 99) * 1e3))
        print('4001 received -> 2002 sent: p50 %.3f ms, p99 %.3f ms' % (pct(outbound, 50) * 1e3, pct(outbound, 99) * 1e3))
        whole = [marks(r)['TRANSCRIBE_END'] - marks(r)['TRANSCRIBE_START'] for r in recs]
        print('whole task incl. conversion of a 0.2 s WAV: p50 %.3f ms, p99 %.3f ms'
              % (pct(whole, 50) * 1e3, pct(whole, 99) * 1e3))
        # throughput: keep up to 100 in flight
        t0 = time.perf_counter()
        sent = got = 0
        window = 100
        while got < n:
            while sent < n and sent - got < window:
                c.send(1002, transcribe_req(d.data, 'short.wav', sid='t%d' % sent))
                sent += 1
            c.recv(60)
            got += 1
        secs = time.perf_counter() - t0
        print('throughput, up to %d in flight, 2 workers: %d tasks in %.2f s = %.0f tasks/s' % (window, n, secs, n / secs))
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
