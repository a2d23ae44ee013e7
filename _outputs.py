"""What `svcmgr transcribe` shows and writes: the files a batch names (folders walked with
a glob), the text/json/srt/vtt of an answer, where each output goes (--out DIR or beside
the input), and the progress line on a terminal. No sockets here; _client.py talks.
"""
import fnmatch
import json
import os
import sys
import time

FORMATS = ('text', 'json', 'srt', 'vtt')
EXTENSION = {'text': 'txt', 'json': 'json', 'srt': 'srt', 'vtt': 'vtt'}


# ---------------------------------------------------------------- the inputs

def expand(args, pattern=None, extensions=()):
    """[(path, rel)] of the files named: a file as given, a folder walked recursively for
    names matching `pattern` (default: the audio extensions), hidden names and `.processing`
    left out; `rel` is the name below the folder, for --out. Missing paths come back as is."""
    exts = {e.lower().lstrip('.') for e in extensions}

    def wanted(name):
        if name.startswith('.'):
            return False
        if pattern:
            return fnmatch.fnmatch(name, pattern)
        return name.rpartition('.')[2].lower() in exts

    out, seen = [], set()
    for arg in args:
        path = os.path.abspath(arg)
        if not os.path.isdir(path):
            found = [(path, os.path.basename(path))]
        else:
            found = []
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
                for name in sorted(files):
                    if wanted(name):
                        full = os.path.join(folder, name)
                        found.append((full, os.path.relpath(full, path)))
        for item in found:
            if item[0] not in seen:
                seen.add(item[0])
                out.append(item)
    return out


def plan_outputs(items, fmt, out_dir=None, beside=False):
    """{input path: output path}: `<stem>.<ext>` under out_dir (keeping the folders below a
    named folder) or beside the input; two inputs that would share one keep their extension."""
    if not out_dir and not beside:
        return {}
    ext = EXTENSION[fmt]
    plan, taken = {}, {}
    for path, rel in items:
        base = os.path.join(os.path.abspath(out_dir), rel) if out_dir else path
        plan[path] = '%s.%s' % (os.path.splitext(base)[0], ext)
        taken.setdefault(plan[path], []).append(path)
    for target, paths in taken.items():
        if len(paths) > 1:
            for path in paths:
                base = os.path.join(os.path.dirname(target), os.path.basename(path))
                plan[path] = '%s.%s' % (base, ext)
    return plan


def write_file(path, text):
    """Write atomically: a reader never sees half an output."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = '%s.tmp.%d' % (path, os.getpid())
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the answers

def one_cue(body):
    """An answer without segments as one cue for the whole call ([] with no transcript)."""
    if not body.get('transcript'):
        return []
    return [(0.0, float(body.get('duration') or 0.0), body['transcript'])]


def clock(secs, sep):
    ms = int(round(secs * 1000))
    return '%02d:%02d:%02d%s%03d' % (ms // 3600000, ms // 60000 % 60, ms // 1000 % 60, sep, ms % 1000)


def render(fmt, path, body):
    """The output text of one successful answer in `fmt`."""
    if fmt == 'text':
        return body.get('transcript', '') + '\n'
    if fmt == 'json':
        keep = ('speechID', 'result', 'transcript', 'channels', 'segments', 'duration', 'audioWAV', 'audioMP3')
        doc = {'file': path}
        doc.update((k, body[k]) for k in keep if k in body)
        return json.dumps(doc, ensure_ascii=False) + '\n'
    if body.get('segments'):
        import _segments
        return _segments.RENDER[fmt](body['segments'], stereo=len(body.get('channels') or ()) > 1)
    lines = ['WEBVTT', ''] if fmt == 'vtt' else []
    for n, (start, end, text) in enumerate(one_cue(body), 1):
        if fmt == 'srt':
            lines.append(str(n))
        sep = ',' if fmt == 'srt' else '.'
        lines += ['%s --> %s' % (clock(start, sep), clock(end, sep)), text, '']
    return '\n'.join(lines) + ('\n' if lines and lines[-1] != '' else '')


# ---------------------------------------------------------------- the terminal

class Progress:
    """One line on a terminal's stderr: done/total, a bar, files/s, ETA and failures,
    redrawn at most 10 times a second; off (plain lines only) when stderr is not a TTY."""

    def __init__(self, total, enabled=None, stream=None, width=30):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.width = total, width
        self.done = self.failed = 0
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.shown = False

    def line(self):
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else None
        filled = int(self.width * self.done / self.total) if self.total else self.width
        eta = '%d:%02d' % divmod(int(left), 60) if left is not None else '?'
        text = '%d/%d files [%s%s] %3d%% %.1f files/s ETA %s' % (
            self.done, self.total, '#' * filled, '.' * (self.width - filled),
            100 * self.done // self.total if self.total else 100, rate, eta)
        if self.failed:
            text += ' failed %d' % self.failed
        return text

    def draw(self, force=False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.drawn_at < 0.1):
            return
        self.drawn_at = now
        self.stream.write('\r\x1b[K' + self.line())
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.enabled and self.shown:
            self.stream.write('\r\x1b[K')
            self.stream.flush()
            self.shown = False

    def step(self, ok):
        self.done += 1
        self.failed += 0 if ok else 1
        self.draw(force=self.done == self.total)

    def close(self):
        if self.enabled and self.shown:
            self.stream.write('\n')
            self.stream.flush()
