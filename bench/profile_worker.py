#!/usr/bin/env python3
"""One profile of a worker's path (issue 17) on one stereo call of tests/callsets.py
(by default the 170 s one): decode and resample (_audio.prepare), the 8 kHz WAV and
MP3 writes, the VAD gate, pocketsphinx on the kept regions, segments and subtitles.

Prints the CPU seconds of each stage (stopwatches on process time, the profiler off),
then pyinstrument's own split of the same run with its sampler on (wall-clock
samples, so on a busy machine they include waits), and its call tree.

Usage: .venv/bin/python bench/profile_worker.py [--call N] [--tree]
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from pyinstrument import Profiler  # noqa: E402

import _audio  # noqa: E402
import _engine  # noqa: E402
import _segments  # noqa: E402
import _vad  # noqa: E402
import callsets  # noqa: E402

CALLS = os.path.join(tempfile.gettempdir(), 'svcmgr-callsets')

# Stage of a frame of pyinstrument's tree: (module file, function or None for any).
STAGES = (
    ('resample (PyAV filter graph)', '_audio.py', 'convert'),
    ('PCM split and copies', '_audio.py', ('_keep', '_split', '_s16_bytes', 'engine_pcm', 'little_endian')),
    ('WAV writes', 'wave.py', None),
    ('WAV publish (rename)', '_audio.py', '_publish'),
    ('MP3 (lameenc)', '_mp3.py', None),
    ('VAD gate', '_vad.py', 'gate'),
    ('pocketsphinx', '_engine.py', ('recognize_kept', 'recognize')),
    ('segments + SRT', '_segments.py', None),
)


def _stage(frame):
    name = os.path.basename(frame.file_path or '')
    for stage, module, functions in STAGES:
        if name == module and (functions is None or frame.function in
                               ((functions,) if isinstance(functions, str) else functions)):
            return stage
    return None


def _split_time(frame, out):
    """Adds each frame's time to its stage, the outermost match only."""
    stage = _stage(frame)
    if stage:
        out[stage] = out.get(stage, 0.0) + frame.time
        return
    if frame.function == 'prepare' and os.path.basename(frame.file_path or '') == '_audio.py':
        out['prepare'] = out.get('prepare', 0.0) + frame.time
    for child in frame.children:
        _split_time(child, out)


def worker_path(engine, call, out):
    """The worker's steps for one call; CPU seconds per step."""
    cpu = {}
    t = time.process_time()
    prepared = _audio.prepare(call.path, engine.sample_rate, audio_path=out, stem='call',
                              mp3_backup=True, write_wav=True)
    cpu['prepare (decode, resample, WAV, MP3)'] = time.process_time() - t
    t = time.process_time()
    settings = _vad.VadSettings()
    gated = _vad.gate(prepared.engine_pcm, engine.sample_rate, settings)
    cpu['VAD gate'] = time.process_time() - t
    t = time.process_time()
    recs = [_vad._remap(engine.recognize_kept(g.pcm, pcm), g, engine.sample_rate)
            for pcm, g in zip(prepared.engine_pcm, gated)]
    cpu['pocketsphinx (kept regions)'] = time.process_time() - t
    t = time.process_time()
    segments = _segments.build(list(zip('AB', recs)), 0.0)
    _segments.RENDER['srt'](segments)
    cpu['segments + SRT'] = time.process_time() - t
    return cpu, prepared.duration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--call', type=int, default=3, help='index in the stereo set (3: 170 s)')
    ap.add_argument('--tree', action='store_true', help="print pyinstrument's call tree")
    args = ap.parse_args()
    call = callsets.make(CALLS, 'stereo', args.call + 1)[args.call]
    engine = _engine.PocketSphinxEngine()
    engine.load()
    with tempfile.TemporaryDirectory() as out:
        cpu, duration = worker_path(engine, call, out)
        total = sum(cpu.values())
        print('stereo call %s, %.1f s; CPU per stage, profiler off:' % (os.path.basename(call.path), duration))
        for stage, secs in cpu.items():
            print('  %-40s %7.2f s  %5.1f %%' % (stage, secs, 100 * secs / total))
        print('  %-40s %7.2f s' % ('total', total))
        profiler = Profiler(interval=0.005, async_mode='disabled')
        profiler.start()
        worker_path(engine, call, out)
        profiler.stop()
    root = profiler.last_session.root_frame()
    split = {}
    _split_time(root, split)
    inside = sum(v for k, v in split.items() if k in {st[0] for st in STAGES[:5]})
    split['decode (PyAV demux + decode) and the rest of prepare'] = split.pop('prepare', 0.0) - inside
    print('pyinstrument, the same path again (wall-clock samples, %.2f s in all):' % root.time)
    for stage, secs in sorted(split.items(), key=lambda kv: -kv[1]):
        print('  %-52s %7.2f s  %5.1f %%' % (stage, secs, 100 * secs / root.time))
    if args.tree:
        print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == '__main__':
    main()
