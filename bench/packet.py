#!/usr/bin/env python3
"""Decoder throughput: a 1 MiB body fed in 1-byte and 4 KiB pieces, and 10,000 small frames."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _packet import FrameDecoder, encode  # noqa: E402


def feed_all(frame, piece):
    dec = FrameDecoder(max_body=2 << 20)
    t = time.perf_counter()
    n = 0
    for i in range(0, len(frame), piece):
        n += len(dec.feed(frame[i:i + piece]))
    return time.perf_counter() - t, n


def main():
    big = encode(1002, b'q' * (1 << 20))
    for piece in (1, 4096):
        secs, n = feed_all(big, piece)
        print('1 MiB body in %5d-byte pieces: %.3f s (%d frame)' % (piece, secs, n))
    small = encode(1002, {'speechID': 'x' * 22, 'filePath': '/data/batch', 'fileID': 'a.wav'}) * 10000
    secs, n = feed_all(small, 65536)
    print('%d small frames in 64 KiB reads: %.3f s (%.1f us/frame)' % (n, secs, secs / n * 1e6))


if __name__ == '__main__':
    main()
