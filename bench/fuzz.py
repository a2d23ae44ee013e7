#!/usr/bin/env python3
"""A long-running protocol fuzzer. Feeds random and mutated frames

1. to the FrameDecoder in-process: only frames or ProtocolError may come out, and
   the process's memory must stay bounded;
2. to a live daemon over many connections: only protocol answers or a close, the
   daemon stays up, its master's memory stays bounded, and a well-behaved client
   is still served at the end.

Prints what it fed and saw. Usage: .venv/bin/python bench/fuzz.py [--seconds 60]
"""
import argparse
import os
import random
import shutil
import socket
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from _packet import FrameDecoder, ProtocolError, encode  # noqa: E402
from conftest import Daemon, transcribe_req  # noqa: E402

SEEDS = [
    encode(1002, {'speechID': 'a', 'filePath': '/data', 'fileID': 'x.wav'}),
    encode(1003, {'type': 'all'}),
    encode(1001, 'sttengine'),
    encode(4001, {'result': '0', 'speechID': 'x', 'transcript': '가나다'}),
    encode(1002, {'speechID': '한국어', 'filePath': 5}),
    b'1002    12a4{}',
    b'100299999999',
]


def mutate(rnd, data):
    data = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.random()
        if op < 0.3 and data:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif op < 0.5:
            data[rnd.randrange(len(data) + 1):0] = os.urandom(rnd.randint(1, 16))
        elif op < 0.7 and data:
            i = rnd.randrange(len(data))
            del data[i:i + rnd.randint(1, 8)]
        elif op < 0.85:
            data += rnd.choice(SEEDS)
        else:
            i = rnd.randrange(len(data) + 1)
            data[i:i] = str(rnd.randint(0, 99999999)).rjust(8).encode()
    return bytes(data)


def sample(rnd):
    if rnd.random() < 0.2:
        return os.urandom(rnd.randint(0, 200))
    return mutate(rnd, rnd.choice(SEEDS))


def fuzz_decoder(rnd, seconds):
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    n = frames = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dec = FrameDecoder(1 << 20)
        data = b''.join(sample(rnd) for _ in range(rnd.randint(1, 5)))
        try:
            i = 0
            while i < len(data):
                step = rnd.randint(1, 40)
                frames += len(dec.feed(data[i:i + step]))
                i += step
        except ProtocolError:
            errors += 1
        n += 1
    rss1 = proc.memory_info().rss
    print('decoder: %d inputs, %d frames, %d ProtocolError, nothing else raised; RSS %+.1f MiB'
          % (n, frames, errors, (rss1 - rss0) / 2 ** 20))


def fuzz_daemon(rnd, seconds):
    tmp = tempfile.mkdtemp(prefix='svcmgr-fuzz-')
    d = Daemon(tmp, workers=1, timeout=2)
    d.start()
    try:
        master = psutil.Process(d.pid)
        rss0 = master.memory_info().rss
        conns = answers = closed = 0
        bad = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = b''.join(sample(rnd) for _ in range(rnd.randint(1, 4)))
            s = socket.create_connection(('127.0.0.1', d.port), timeout=5)
            conns += 1
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = b''
                s.settimeout(3)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        closed += 1
                        break
                    got += chunk
            except (OSError, socket.timeout):
                pass
            finally:
                s.close()
            try:
                for ptype, _ in FrameDecoder(64 << 20).feed(got):
                    answers += 1
                    if not 2000 <= ptype < 3000:
                        bad.append(ptype)
            except ProtocolError as exc:
                bad.append(str(exc))
        time.sleep(3)      # let partial-frame deadlines close what the fuzzer left open
        rss1 = master.memory_info().rss
        c = d.client()
        d.fixture('en_morning.wav')
        c.send(1002, transcribe_req(d.data, 'en_morning.wav', sid='after'))
        ok = c.recv(60)[1].get('result') == '0'
        print('daemon: %d connections, %d answers, %d closed by the daemon, %d unexpected answers'
              % (conns, answers, closed, len(bad)))
        print('daemon: master RSS %.1f -> %.1f MiB; alive: %s; served a real client after: %s; '
              'tracebacks in psout.log: %d'
              % (rss0 / 2 ** 20, rss1 / 2 ** 20, master.is_running(), ok, d.psout().count('Traceback')))
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--seconds', type=float, default=60)
    ap.add_argument('--seed', type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    fuzz_decoder(rnd, args.seconds / 2)
    fuzz_daemon(rnd, args.seconds / 2)


if __name__ == '__main__':
    main()
