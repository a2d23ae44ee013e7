"""Conversion throughput: _audio.prepare() (PyAV in-process, one decode, files plus
engine PCM) against one `ffmpeg` process per file, the 1.0 way, on the same files.

Usage: .venv/bin/python bench/convert.py [--files 50] [--seconds 30] [--engine-rate 16000]
Sources and outputs go to bench/out/ (ignored by git). Nothing is installed: without
an `ffmpeg` on PATH only the PyAV figure is printed.
"""
import argparse
import array
import os
import resource
import shutil
import subprocess
import sys
import time
import wave

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import _audio  # noqa: E402  (needs ROOT on the path first)

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
OUT = os.path.join(HERE, 'out')


def read_samples(name):
    with wave.open(os.path.join(FIXTURES, name)) as w:
        samples = array.array('h')
        samples.frombytes(w.readframes(w.getnframes()))
        return w.getnchannels(), samples


def make_sources(count, seconds):
    """`count` call-like 8 kHz WAVs of `seconds` each: odd ones stereo, even ones mono."""
    folder = os.path.join(OUT, 'src')
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    _ch, mono = read_samples('en_hello.wav')
    _ch, stereo = read_samples('stereo_call.wav')
    paths = []
    for index in range(count):
        channels, speech = (2, stereo) if index % 2 else (1, mono)
        want = int(seconds * 8000) * channels
        data = (speech * (want // len(speech) + 1))[:want]
        path = os.path.join(folder, 'call{:03}.wav'.format(index))
        with wave.open(path, 'wb') as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(data.tobytes())
        paths.append((path, channels))
    return paths


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pyav(sources, engine_rate, mp3):
    """(wall, CPU) seconds of prepare() over `sources`."""
    folder = os.path.join(OUT, 'pyav')
    shutil.rmtree(folder, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for path, _channels in sources:
        stem = os.path.splitext(os.path.basename(path))[0]
        _audio.prepare(path, engine_rate, folder, stem, mp3_backup=mp3)
    return time.perf_counter() - wall, time.process_time() - cpu


def ffmpeg_command(ffmpeg, path, folder, channels, mp3):
    """One process making the 8 kHz WAV, the 64k MP3 and, for stereo, _A and _B."""
    stem = os.path.join(folder, os.path.splitext(os.path.basename(path))[0])
    cmd = [ffmpeg, '-nostdin', '-v', 'error', '-y', '-i', path,
           '-ar', '8000', '-c:a', 'pcm_s16le', stem + '.wav']
    if mp3:
        cmd += ['-ar', '8000', '-c:a', 'libmp3lame', '-b:a', '64k', stem + '.mp3']
    if channels == 2:
        for index, side in enumerate('AB'):
            cmd += ['-af', 'pan=mono|c0=c{}'.format(index), '-ar', '8000',
                    '-c:a', 'pcm_s16le', '{}_{}.wav'.format(stem, side)]
    return cmd


def run_ffmpeg(ffmpeg, sources, mp3):
    """(wall, CPU of the ffmpeg processes) seconds over `sources`."""
    folder = os.path.join(OUT, 'ffmpeg')
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    wall, cpu = time.perf_counter(), children_cpu()
    for path, channels in sources:
        subprocess.run(ffmpeg_command(ffmpeg, path, folder, channels, mp3), check=True)
    return time.perf_counter() - wall, children_cpu() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--files', type=int, default=50)
    parser.add_argument('--seconds', type=float, default=30.0)
    parser.add_argument('--engine-rate', type=int, default=16000)
    args = parser.parse_args()

    sources = make_sources(args.files, args.seconds)
    audio = len(sources) * args.seconds
    print('{} files of {:g} s (half mono, half stereo), 8 kHz 16-bit WAV in; out: 8 kHz WAV, '
          '_A/_B for stereo, 64k MP3; PyAV also makes the engine PCM at {} Hz'.format(
              args.files, args.seconds, args.engine_rate))
    ffmpeg = shutil.which('ffmpeg')
    if ffmpeg is None:
        print('no `ffmpeg` on PATH: the subprocess side is not measured')
    # The machine may be shared: CPU seconds say more than wall seconds then.
    row = '{:28} wall {:7.2f} s  cpu {:7.2f} s  ({:5.1f}x real time)'
    for mp3, label in ((True, 'with MP3'), (False, 'WAV only')):
        # A warm-up each, so neither side pays first-time loading inside the figure.
        run_pyav(sources[:2], args.engine_rate, mp3)
        pyav = run_pyav(sources, args.engine_rate, mp3)
        print(row.format('PyAV in-process, ' + label, *pyav, audio / pyav[0]))
        if ffmpeg is None:
            continue
        run_ffmpeg(ffmpeg, sources[:2], mp3)
        sub = run_ffmpeg(ffmpeg, sources, mp3)
        print(row.format('ffmpeg per file, ' + label, *sub, audio / sub[0]))
        print('{:28} wall {:7.2f}     cpu {:7.2f}'.format(
            'ratio ffmpeg / PyAV', sub[0] / pyav[0], sub[1] / pyav[1]))


if __name__ == '__main__':
    main()
