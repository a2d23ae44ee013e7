"""app.ini for svcmgr: the one configspec, loading with every problem reported at once, and logging.

Everything else reads settings as cfg['section']['key'] on the ConfigObj that load() returns,
already converted to its type, with paths absolute and 'auto' resolved.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import urllib.parse

import configobj
from configobj.validate import (
    ValidateError,
    Validator,
    VdtTypeError,
    VdtValueError,
    VdtValueTooBigError,
    VdtValueTooSmallError,
    is_boolean,
    is_float,
    is_integer,
    is_option,
)

import _engine

log = logging.getLogger(__name__)

# Every key, once: its check (type, range, default) and why it exists. Relative paths are
# resolved against the folder of app.ini, never the cwd, because the daemon chdirs when it
# detaches and start.sh may be run from anywhere.
CONFIGSPEC = """
[setting]
# TEST: every process logs to <log_path>/app.log, handy when debugging; PROD: one file per
# process, rotated at midnight, 31 days kept.
mode = option('TEST', 'PROD', default='TEST')
# Lowest level written to the log files.
log_level = option('debug', 'info', 'warning', 'error', 'critical', default='info')
# Folder of the log files; created when missing.
log_path = path(default='logs')
# file: log_path as mode says; stderr: every process writes to its stderr (under systemd, the
# journal; `start` sends the daemon's stderr to psout).
log_to = option('file', 'stderr', default='file')
# text: one line per record; json: one JSON object per line (time, level, role, pid, logger,
# message, speechID when the line names one, exc) for a log shipper.
log_format = option('text', 'json', default='text')
# Version reported by Monitor (2003).
version = string(default='2.0')
# PacketAgent worker processes; 'auto' = the CPU count.
worker_processes = workers(min=1, max=64, default='auto')
# Tasks queued or running at once; the next one is refused with result 6.
max_tasks = integer(min=1, max=100000, default=100)
# Deadline of a task (result 5) and of a frame that arrives only in part.
session_timeout_secs = float(min=0.1, max=86400, default=30)
# On stop, how long running tasks may finish before they are answered with result 3.
graceful_timeout_secs = float(min=0, max=3600, default=30)
# Period of the CPU, memory, disk and process snapshot that Monitor answers from.
monitor_interval_secs = float(min=0.1, max=3600, default=5)
# Period of the workers' heartbeats; an idle worker silent for 5 periods (at least 10 s) is killed
# and replaced (a busy one is bounded by session_timeout_secs).
heartbeat_secs = float(min=0.1, max=3600, default=2)
# A worker leaves after this many tasks, or once its private memory passes
# max_worker_memory_mb after a task, and a fresh one takes its place (kept recognizers grow); 0 = never.
max_tasks_per_worker = integer(min=0, max=100000000, default=1000)
max_worker_memory_mb = integer(min=0, max=1048576, default=1024)
# Pid file of the daemon; lets stop and status find it without grepping ps.
pidfile = path(default='svcmgr.pid')
# The daemon's stdout and stderr: start/stop banners and tracebacks nothing else caught.
psout = path(default='psout.log')

[task]
# Also write a 64 kbit/s MP3 of each call into audio_target_path.
mp3_backup = boolean(default=True)
# The MP3 encoder (_mp3.py): lameenc, or pyav (2.0's libmp3lame through PyAV, about 3x the CPU).
mp3_encoder = option('lameenc', 'pyav', default='lameenc')
# Where a source that failed goes: scanned files always, a client's when source_after = delete;
# a <name>.reason text is written beside it.
error_backup_path = path(default='error')
# Keep the converted WAVs after recognition (disk space against being able to re-run).
keep_wav = boolean(default=True)
# What happens to a client's source file after a successful conversion (1.0 deleted it).
source_after = option('delete', 'keep', default='delete')
# How many times a task whose worker died is tried again elsewhere before result 9.
retry_on_worker_death = integer(min=0, max=5, default=1)
# Subtitles of each task's segments written beside the WAV: srt, vtt, both or none (empty).
subtitles = subtitle_formats(default=list())
# A segment whose confidence (mean of its words', 0..1) is below this is flagged lowConfidence.
low_confidence = float(min=0, max=1, default=0.5)

[directory]
# Folder scanned (recursively) for audio files dropped in.
audio_source_path = path(default='batch')
# Where converted WAVs and MP3 backups are written.
audio_target_path = path(default='batch/rec_mp3')
# Period of the scan; a file is taken once unchanged for one period.
scan_interval_secs = float(min=0.1, max=86400, default=40)
# Turn the scanner off to serve TCP clients only.
scan_enabled = boolean(default=True)
# auto: inotify wakes the scanner when a file is closed after writing or moved in, and it is
# taken once unchanged for scan_settle_secs (polling stays for what inotify cannot see: NFS/SMB
# shares written from other hosts); poll: scans every scan_interval_secs only.
scan_watch = option('auto', 'poll', default='auto')
scan_settle_secs = float(min=0.1, max=3600, default=1)
# Name patterns the scanner leaves alone: files still being copied in.
scan_ignore = string_list(default=list('*.part', '*.tmp', '~*'))
# Extensions the scanner takes, without the dot, case-insensitive.
scan_extensions = string_list(default=list('wav', 'mp3', 'm4a', 'ogg', 'flac', 'wma', 'aac', 'amr', 'pcm'))
# Where a scanned file goes after success when [task] source_after = keep (below it, the
# file's subfolder); it must leave audio_source_path so that it is never taken twice.
scan_done_path = path(default='batch/done')
# Domain given to scanned files, which carry no request.
domain_code = string(default='SG0001')
domain_name = string(default='SGDefault')
# Take a scanned file's domainCode from its first folder below audio_source_path.
domain_from_folder = boolean(default=False)
# Folders a request's paths must resolve into (after following links); empty means
# audio_source_path, audio_target_path and error_backup_path.
allowed_roots = path_list(default=list())

[server]
# Address to listen on (0.0.0.0 = every IPv4 interface).
ip = ip_address(default='127.0.0.1')
port = integer(min=1, max=65535, default=9099)
# Largest frame body accepted; a bigger one is refused before it is read.
max_packet_bytes = integer(min=1024, max=67108864, default=1048576)
# Client and engine connections open at once; more are closed on accept.
max_connections = integer(min=1, max=100000, default=1024)
# Client networks allowed to connect, in CIDR form (127.0.0.0/8); empty = any.
allow = cidr_list(default=list())
# This node's number (serverSeq in 3001 and in records).
server_seq = integer(min=0, max=1000000, default=1)
# domainSeq and imageSeq of 3001 when the database does not give them.
domain_seq = integer(min=0, max=2147483647, default=0)
image_seq = integer(min=0, max=2147483647, default=0)

[engine]
# pocketsphinx and vosk run inside the workers; remote waits for engines that log in.
type = option(<engine types>, default=<first engine type>)
# pocketsphinx: empty = the English model in its wheel; vosk: a model folder or 'ko'.
model = string(default='')
# vosk: the rate (Hz) of the audio given to the model; 0 = the model folder's. pocketsphinx: its own.
sample_rate = integer(min=0, max=192000, default=0)
# The same recording always gives the same transcript, segments, times and confidences:
# pocketsphinx and Vosk with dither off (Vosk through a dither-off overlay of the model that
# svcmgr keeps in cache/vosk/), PCM fed in fixed chunks. See app.ini for what it costs.
deterministic = boolean(default=True)
# remote: how many engines may be logged in at once (1.0 had one).
engine_slots = integer(min=1, max=1000, default=1)
# remote: tasks one logged-in engine is given at once (least busy engine first).
engine_concurrency = integer(min=1, max=10000, default=1)
# Speed (issue 17, _vad.py): only the speech regions of each channel reach an embedded engine;
# word times are mapped back to the source. The thresholds below tune what counts as speech.
vad = boolean(default=True)
# WebRTC VAD mode: 0 keeps the most, 3 the least.
vad_aggressiveness = integer(min=0, max=3, default=3)
# Frames below this level (dBFS) are silence whatever the VAD says (line hiss, hold).
vad_min_dbfs = float(min=-96, max=0, default=-45)
# Audio kept before and after each region (quiet onsets need more before), and pauses
# inside speech kept as they are.
vad_padding_secs = float(min=0, max=5, default=0.3)
vad_padding_after_secs = float(min=0, max=5, default=0.06)
# Onset (regions after a channel's first): the start moves back over the frames WebRTC's VAD
# in this mode still calls voice, then vad_lead_secs more, vad_padding_secs at most; -1 = off.
vad_onset_aggressiveness = integer(min=-1, max=3, default=0)
vad_lead_secs = float(min=0, max=5, default=0.1)
vad_bridge_secs = float(min=0, max=10, default=0.5)
# Bursts shorter than this are clicks, not words.
vad_min_speech_secs = float(min=0, max=5, default=0.12)
# Stereo: a channel this many dB quieter than the other at the same moment carries only the
# other party's echo there; 0 = keep it.
vad_crosstalk_db = float(min=0, max=96, default=15)
# vosk: keep one recognizer per worker (reset between calls) instead of one per call.
keep_recognizer = boolean(default=True)

[webhook]
# Finished tasks are POSTed here; empty = off.
url = http_url(default='')
# Signs each POST (webhook-signature: v1,<base64 HMAC-SHA256>); 'whsec_<base64>' is decoded
# as Standard Webhooks libraries expect, other text is the key as written; empty = unsigned.
secret = string(default='')
# Name of an environment variable holding the secret; used when set and present.
secret_env = string(default='')
# Limits of one POST: connecting, then each wait for the receiver's answer.
connect_timeout_secs = float(min=0.1, max=300, default=5)
read_timeout_secs = float(min=0.1, max=3600, default=10)
# Sender threads, so that a slow receiver is still kept up with.
concurrency = integer(min=1, max=64, default=4)
# Retries wait base, 2x base, 4x base, ... up to max, each with jitter (half to all of it).
backoff_base_secs = float(min=0.01, max=86400, default=5)
backoff_max_secs = float(min=0.01, max=604800, default=3600)
# An entry still undelivered this long after its task ended moves to records/webhook/failed/.
give_up_after_secs = float(min=1, max=31536000, default=259200)
# Also give up after this many attempts; 0 = no limit but give_up_after_secs.
max_attempts = integer(min=0, max=1000000, default=0)
# How often the senders look for entries they do not know (redelivered, left by a stop).
rescan_secs = float(min=0.1, max=3600, default=5)

[http]
# The web process: HTTP API (OpenAI-compatible transcription, tasks), dashboard, /metrics.
enabled = boolean(default=True)
ip = ip_address(default='127.0.0.1')
port = integer(min=1, max=65535, default=9098)
# Largest upload; a bigger one is answered 413 before it is written whole.
max_upload_mb = float(min=0.001, max=1048576, default=512)
# Uploads streamed at once; more get 503 with Retry-After.
max_uploads = integer(min=1, max=10000, default=16)
# Bearer tokens; with any set, everything but /healthz needs one. Required off loopback.
tokens = string_list(default=list())
# Name of an environment variable holding more tokens (comma-separated); used when present.
token_env = string(default='')
# Folder of uploads while their task runs (tasks may read it even when it is not inside
# allowed_roots); outside audio_source_path. Cluster mode: <shared_path>/uploads/<node>/ unless set
# inside <shared_path>/uploads/ (_cluster_uploads).
upload_path = path(default='uploads')
# Keep an upload after its task instead of removing it.
keep_uploads = boolean(default=False)

[db]
# Write a row per task and the status row; off = records files only.
enabled = boolean(default=False)
ip = string(default='127.0.0.1')
port = integer(min=1, max=65535, default=3306)
user = string(default='root')
password = string(default='')
# Name of an environment variable holding the password, so it need not sit in app.ini;
# used when set and present.
password_env = string(default='')
name = string(default='svcmgr')
# This node's key in the node_status table and in task.node; empty = <hostname>:<[server] port>.
node = string(default='')

[cluster]
# Cluster mode: every task goes through a RabbitMQ quorum queue and runs on whichever node
# takes it; MariaDB ([db]) holds the cluster's state. Off = one node, no broker at all.
enabled = boolean(default=False)
broker_url = amqp_url(default='amqp://guest:guest@127.0.0.1:5672/%2F')
# The quorum queue; dead letters go to <queue>.dead, each node's answers to <queue>.reply.<node>.
queue = string(default='svcmgr.tasks')
# A node whose heartbeat is older is dead: its tasks and claims are taken over.
node_dead_secs = float(min=1, max=3600, default=15)
# How often this node's heartbeat row is refreshed.
heartbeat_secs = float(min=0.1, max=600, default=2)
# Runs of one task (each cut short by the death of its node) before it ends with result 9.
delivery_limit = integer(min=1, max=100, default=2)
# Storage every node mounts (NFS): a node's records then go to <shared_path>/records/<node>/,
# its uploads to <shared_path>/uploads/<node>/ (needed with [http] enabled).
shared_path = string(default='')
"""
# The engine types are the registry's keys (_engine.ENGINES), so adding a type is one line there.
CONFIGSPEC = CONFIGSPEC.replace('<engine types>', ', '.join(repr(name) for name in _engine.ENGINES)) \
    .replace('<first engine type>', repr(next(iter(_engine.ENGINES))))

_LOG_FORMAT = '%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s'


class ConfigError(Exception):
    """app.ini cannot be used; .problems has one line per problem, ready to print."""

    def __init__(self, problems):
        self.problems = list(problems)
        # The list itself is the argument so that the error survives pickling intact.
        super().__init__(self.problems)

    def __str__(self):
        return '\n'.join(self.problems)


class _Problem(ValidateError):
    """A check failure whose message is complete, so the report needs no second guess."""


def _show(value) -> str:
    if isinstance(value, dict):
        return '[section]'
    if isinstance(value, (list, tuple)):
        return ', '.join(str(item) for item in value)
    return str(value)


def _the(value) -> str:
    return f'the value "{_show(value)}"'


def _ranged(check, expected, value, min=None, max=None):
    # The stock messages say "too small" without saying what would have been enough.
    try:
        return check(value, min, max)
    except VdtTypeError:
        raise _Problem(f'{_the(value)} is of the wrong type (expected {expected})') from None
    except VdtValueTooSmallError:
        raise _Problem(f'{_the(value)} is too small (minimum {min})') from None
    except VdtValueTooBigError:
        raise _Problem(f'{_the(value)} is too big (maximum {max})') from None


def _integer(value, min=None, max=None):
    return _ranged(is_integer, 'an integer', value, min, max)


def _float(value, min=None, max=None):
    return _ranged(is_float, 'a number', value, min, max)


def _boolean(value):
    try:
        return is_boolean(value)
    except VdtTypeError:
        raise _Problem(f'{_the(value)} is of the wrong type (expected true or false)') from None


def _option(value, *options):
    try:
        return is_option(value, *options)
    except (VdtTypeError, VdtValueError):
        raise _Problem(f'{_the(value)} is not allowed (expected one of: {", ".join(options)})') from None


def _string(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        # configobj splits an unquoted value at commas; a password with one is the usual victim.
        raise _Problem(f'{_the(value)} is a list (expected one value; put it in quotes'
                       ' if it contains a comma)')
    raise _Problem(f'{_the(value)} is of the wrong type (expected a string)')


def _string_list(value):
    # configobj only makes a list of a value with a comma in it; "allow = 10.0.0.0/8" and
    # "allow =" must mean a list of one and an empty list, not a type error.
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise _Problem(f'{_the(value)} is of the wrong type (expected a comma-separated list)')
    return [item.strip() for item in items if item.strip()]


def _subtitle_formats(value):
    formats = [item.lower() for item in _string_list(value)]
    bad = [item for item in formats if item not in ('srt', 'vtt')]
    if bad:
        raise _Problem(f'{_the(bad)} is not a subtitle format (expected srt, vtt or both)')
    return list(dict.fromkeys(formats))


def _workers(value, min=None, max=None):
    if isinstance(value, str) and value.strip().lower() == 'auto':
        return 'auto'
    return _ranged(is_integer, '"auto" or an integer', value, min, max)


def _ip_address(value):
    text = _string(value).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _Problem(f'{_the(value)} is not an IPv4 or IPv6 address') from None
    return text


def _cidr_list(value):
    networks, bad = [], []
    for item in _string_list(value):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            bad.append(item)
    if bad:
        raise _Problem(f'{_the(bad)} is not a network in CIDR form (e.g. 127.0.0.0/8)')
    return networks


def _url(value, schemes, what):
    text = _string(value).strip()
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in schemes or not parts.hostname:
        raise _Problem(f'{_the(value)} is not {what} URL')
    return text


def _http_url(value):
    if not _string(value).strip():
        return ''
    return _url(value, ('http', 'https'), 'an http:// or https://')


def _amqp_url(value):
    return _url(value, ('amqp', 'amqps'), 'an amqp:// or amqps://')


def _validator(base: str) -> Validator:
    """A Validator whose path checks resolve against base, the folder of app.ini."""

    def absolute(text: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(text.strip())))

    def path(value):
        text = _string(value)
        if not text.strip():
            raise _Problem('the value is empty (expected a path)')
        return absolute(text)

    def path_list(value):
        # realpath, because requests are checked against these after following links.
        return list(dict.fromkeys(os.path.realpath(absolute(item)) for item in _string_list(value)))

    return Validator({
        'integer': _integer,
        'float': _float,
        'boolean': _boolean,
        'option': _option,
        'string': _string,
        'string_list': _string_list,
        'workers': _workers,
        'subtitle_formats': _subtitle_formats,
        'ip_address': _ip_address,
        'cidr_list': _cidr_list,
        'http_url': _http_url,
        'amqp_url': _amqp_url,
        'path': path,
        'path_list': path_list,
    })


def _syntax_problem(name: str, error: configobj.ConfigObjError) -> str:
    line = (getattr(error, 'line', '') or '').strip()
    if isinstance(error, configobj.DuplicateError):
        what = 'duplicate section' if line.startswith('[') else 'duplicate key'
    elif isinstance(error, configobj.NestingError):
        what = 'section nested deeper than its parent'
    elif str(error).startswith('Invalid line'):
        what = 'neither "key = value" nor "[section]"'
    else:
        what = str(error).split(' at line ')[0].rstrip('.').lower()
    return f'{name} line {getattr(error, "line_number", "?")}: {what}: {line}'


def _where(sections, key) -> str:
    place = f"[{'.'.join(sections)}]" if sections else ''
    return ' '.join(part for part in (place, key) if part)


def _spec_has_section(spec, sections, key) -> bool:
    for name in sections:
        spec = spec[name]
    return key in spec.sections


def _shadowing_sections(name: str, section, spec, sections=()) -> list[str]:
    """Report, and drop, subsections named like a key: configobj's validate() crashes on them."""
    problems = []
    for key in list(section.sections):
        if key in spec.scalars:
            problems.append(f'{name} {_where(sections, key)}: is a [[section]], expected a key')
            del section[key]
        elif key in spec.sections:
            problems += _shadowing_sections(name, section[key], spec[key], sections + (key,))
    return problems


def _validation_problems(name: str, cfg: configobj.ConfigObj, result) -> list[str]:
    problems = []
    for sections, key, error in configobj.flatten_errors(cfg, result):
        if isinstance(error, _Problem):
            what = str(error)
        elif error is False:
            what = 'missing'
        elif key is not None and _spec_has_section(cfg.configspec, sections, key):
            what = 'is a key, expected a [section]'
        else:
            what = str(error)
        problems.append(f'{name} {_where(sections, key)}: {what}')

    extras = list(configobj.get_extra_values(cfg))
    if 'DEFAULT' in cfg.sections:
        # configobj's validate() passes over a top-level DEFAULT section silently.
        extras.append(((), 'DEFAULT'))
    for sections, key in extras:
        section = cfg
        for part in sections:
            section = section[part]
        if key in section.sections:
            problems.append(f'{name} {_where(list(sections) + [key], None)}: unknown section')
        elif sections:
            problems.append(f'{name} {_where(sections, key)}: unknown key')
        else:
            problems.append(f'{name} {key}: unknown key (keys belong under a [section])')
    return problems


def load(path: str) -> configobj.ConfigObj:
    """Read and validate app.ini; raise ConfigError listing every problem found."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ConfigError([f'{name}: no such file: {path}'])
    try:
        cfg = configobj.ConfigObj(
            path, configspec=CONFIGSPEC.splitlines(), file_error=True, encoding='utf-8',
            # A password with % or $ in it must reach the database as written.
            interpolation=False)
    except configobj.ConfigObjError as exc:
        raise ConfigError([_syntax_problem(name, error) for error in exc.errors]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f'{name}: not UTF-8 text (byte {exc.start}): {path}']) from None
    except OSError as exc:
        raise ConfigError([f'{name}: cannot read {path}: {exc.strerror or exc}']) from None

    problems = _shadowing_sections(name, cfg, cfg.configspec)
    result = cfg.validate(_validator(os.path.dirname(path)), preserve_errors=True)
    problems += _validation_problems(name, cfg, result)
    if problems:
        raise ConfigError(problems)

    setting = cfg['setting']
    if setting['worker_processes'] == 'auto':
        setting['worker_processes'] = os.cpu_count() or 1
    directory = cfg['directory']
    if directory['scan_enabled']:
        # Outputs, failed and kept files written into the scanned folder itself would be taken again, forever.
        source = os.path.realpath(directory['audio_source_path'])
        for section, key in (('directory', 'audio_target_path'), ('task', 'error_backup_path'),
                             ('directory', 'scan_done_path')):
            folder = os.path.realpath(cfg[section][key])
            if source == folder or source.startswith(folder.rstrip(os.sep) + os.sep):
                raise ConfigError([f'{name} [{section}] {key}: must not be audio_source_path or a folder'
                                   ' above it (the scanner would take what it writes there again)'])
    if not directory['allowed_roots']:
        roots = (directory['audio_source_path'], directory['audio_target_path'],
                 cfg['task']['error_backup_path'])
        directory['allowed_roots'] = list(dict.fromkeys(os.path.realpath(root) for root in roots))
    _check_cluster(name, cfg, os.path.dirname(path))
    _check_http(name, cfg)
    db = cfg['db']
    if db['password_env'] and db['password_env'] in os.environ:
        db['password'] = os.environ[db['password_env']]
    webhook = cfg['webhook']
    if webhook['secret_env'] and webhook['secret_env'] in os.environ:
        webhook['secret'] = os.environ[webhook['secret_env']]
    if webhook['secret'].startswith('whsec_'):
        try:
            base64.b64decode(webhook['secret'][len('whsec_'):], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError([f'{name} [webhook] secret: a whsec_ secret must be base64 after the prefix']) from None
    return cfg


def _check_http(name: str, cfg: configobj.ConfigObj) -> None:
    """[http]: tokens from token_env; off loopback only with a token; uploads inside the roots."""
    http = cfg['http']
    if http['token_env'] and os.environ.get(http['token_env']):
        http['tokens'] = list(http['tokens']) + [t.strip() for t in os.environ[http['token_env']].split(',')
                                                 if t.strip()]
    if not http['enabled']:
        return
    if not ipaddress.ip_address(http['ip']).is_loopback and not http['tokens']:
        raise ConfigError([f'{name} [http] tokens: the web process listens on {http["ip"]}, which is not'
                           ' loopback; set at least one token (or token_env)'])
    upload = os.path.realpath(http['upload_path'])
    source = os.path.realpath(cfg['directory']['audio_source_path'])
    if cfg['directory']['scan_enabled'] and (upload == source or upload.startswith(source + os.sep)):
        raise ConfigError([f'{name} [http] upload_path: must not lie in audio_source_path'
                           ' (the scanner would take uploads)'])


def _check_cluster(name: str, cfg: configobj.ConfigObj, base: str) -> None:
    """[cluster]: on only with the database; a queue name RabbitMQ takes; shared_path absolute."""
    cluster = cfg['cluster']
    if cluster['shared_path'].strip():
        cluster['shared_path'] = os.path.normpath(os.path.join(base, cluster['shared_path'].strip()))
    queue = cluster['queue']
    if not re.fullmatch(r'[A-Za-z0-9_.:-]{1,200}', queue):
        raise ConfigError([f'{name} [cluster] queue: use 1-200 characters of A-Z a-z 0-9 _ . : -'])
    if cluster['enabled'] and not cfg['db']['enabled']:
        raise ConfigError([f'{name} [cluster] enabled: cluster mode keeps its state in the database;'
                           ' set [db] enabled = true too'])
    if cluster['enabled'] and cluster['node_dead_secs'] <= 2 * cluster['heartbeat_secs']:
        raise ConfigError([f'{name} [cluster] node_dead_secs: must be more than twice heartbeat_secs'
                           ' (a live node would be taken for dead)'])
    node = node_name(cfg)
    if cluster['enabled'] and not re.fullmatch(r'[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,127}', node):
        # It names a folder on the shared storage (records, uploads), a reply queue and rows.
        raise ConfigError([f'{name} [db] node: in cluster mode use 1-128 characters of A-Z a-z 0-9 _ . : -,'
                           f' not starting with "." (it names this node\'s folders on the shared storage):'
                           f' {node!r}'])
    if cluster['enabled'] and cfg['http']['enabled']:
        _cluster_uploads(name, cfg, base)


def _cluster_uploads(name: str, cfg: configobj.ConfigObj, base: str) -> None:
    """Cluster mode's uploads: an HTTP task runs on whichever node takes it, which reads the upload,
    so uploads live under <shared_path>/uploads/ (by default <shared_path>/uploads/<node>/: a web
    process removes at its start the uploads of its folder that no task of its node waits for)."""
    shared = cfg['cluster']['shared_path']
    if not shared:
        raise ConfigError([f'{name} [cluster] shared_path: cluster mode with [http] enabled needs it: an'
                           ' upload is read by the node that runs its task, so uploads live on the shared'
                           ' storage (or set [http] enabled = false)'])
    uploads = os.path.join(shared, 'uploads')
    http = cfg['http']
    # The shipped app.ini's `upload_path = uploads` counts as unset: an operator who turns cluster
    # mode on expects the uploads to follow the shared storage.
    if 'upload_path' in http.defaults or http['upload_path'] == os.path.join(base, 'uploads'):
        http['upload_path'] = os.path.join(uploads, node_name(cfg))
    elif not inside(os.path.realpath(http['upload_path']), [os.path.realpath(uploads)]):
        raise ConfigError([f'{name} [http] upload_path: in cluster mode it must lie in {uploads}'
                           ' (<[cluster] shared_path>/uploads/), where every node can read it; leave it'
                           ' unset for <shared_path>/uploads/<node>/'])


def node_name(cfg: configobj.ConfigObj) -> str:
    """This node's name: [db] node, or <hostname>:<[server] port>."""
    node = (cfg['db'].get('node') or '').strip()
    return node or '%s:%s' % (socket.gethostname(), cfg['server']['port'])


def records_dir(cfg: configobj.ConfigObj) -> str:
    """Where the usage records go: records/ beside app.ini, or in cluster mode with a
    shared_path, <shared_path>/records/<node>/ (a live node reads a dead node's there)."""
    c = cfg['cluster']
    if c['enabled'] and c['shared_path']:
        return os.path.join(c['shared_path'], 'records', node_name(cfg))
    return os.path.join(base_dir(cfg), 'records')


def task_roots(cfg: configobj.ConfigObj) -> list:
    """The folders a task's paths may resolve into: [directory] allowed_roots, plus [http]
    upload_path when the web process is on (it names every file there itself); in cluster mode
    <shared_path>/uploads/, where every node's web process keeps its uploads."""
    roots = [os.path.realpath(r) for r in cfg['directory']['allowed_roots']]
    if cfg['http']['enabled']:
        c = cfg['cluster']
        upload = os.path.realpath(os.path.join(c['shared_path'], 'uploads') if c['enabled'] and c['shared_path']
                                  else cfg['http']['upload_path'])
        if not inside(upload, roots):
            roots.append(upload)
    return roots


def inside(path: str, roots) -> bool:
    """True when the absolute, resolved `path` is one of `roots` ([directory] allowed_roots) or below one."""
    return any(path == root or path.startswith(root.rstrip('/') + '/') for root in roots)


# The folders `start` makes sure of before anything binds or forks: (section, key, made at start).
FOLDERS = (('setting', 'log_path', True), ('directory', 'audio_source_path', True),
           ('directory', 'audio_target_path', True), ('task', 'error_backup_path', True),
           ('directory', 'scan_done_path', False))


def _folder_problem(folder: str, make: bool):
    """Why `folder` cannot be used (made when `make`, else only its nearest existing parent
    checked, the daemon making it when first needed), or None."""
    try:
        if make:
            os.makedirs(folder, exist_ok=True)
        else:
            while not os.path.exists(folder) and os.path.dirname(folder) != folder:
                folder = os.path.dirname(folder)
    except OSError as exc:
        blocker = folder
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        hint = ' (%s is a file, not a folder)' % blocker if os.path.isfile(blocker) else ''
        return f'cannot create {folder}: {exc.strerror or exc}{hint}'
    if not os.path.isdir(folder):
        return f'{folder} is a file, not a folder'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'{folder} is not writable by uid {os.getuid()}'
    return None


def check_folders(cfg: configobj.ConfigObj) -> list:
    """One line per folder `start` cannot use (exit 2 before binding), naming the key to change."""
    name = os.path.basename(cfg.filename)
    problems = []
    for section, key, make in FOLDERS:
        if key == 'scan_done_path' and not cfg['directory']['scan_enabled']:
            continue
        problem = _folder_problem(cfg[section][key], make)
        if problem:
            problems.append(f'{name} [{section}] {key}: {problem}')
    base = base_dir(cfg)
    for label, path in (('records folder', os.path.join(base, 'records')),
                        ('[setting] pidfile', os.path.dirname(cfg['setting']['pidfile'])),
                        ('[setting] psout', os.path.dirname(cfg['setting']['psout']))):
        problem = _folder_problem(path, label == 'records folder')
        if problem:
            problems.append(f'{name} {label}: {problem}')
    for root in cfg['directory']['allowed_roots']:
        if not os.path.isdir(root):
            problems.append(f'{name} [directory] allowed_roots: {root} does not exist (or is not a folder):'
                            ' create it or take it out of the list')
    return problems


def in_drop_folder(cfg: configobj.ConfigObj, real: str) -> bool:
    """True when the resolved path `real` lies where the scanner takes files (audio_source_path
    and below, its working folders aside) and the scanner is on: such a file is the scanner's."""
    directory = cfg['directory']
    if not directory['scan_enabled'] or not inside(real, [os.path.realpath(directory['audio_source_path'])]):
        return False
    working = (directory['audio_target_path'], cfg['task']['error_backup_path'], directory['scan_done_path'])
    return not inside(real, [os.path.realpath(folder) for folder in working])


def base_dir(cfg: configobj.ConfigObj) -> str:
    """The folder of the loaded app.ini, against which its relative paths were resolved."""
    return os.path.dirname(os.path.abspath(cfg.filename))


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; `role` is the process (master, worker-1, ...)."""

    def __init__(self, role):
        super().__init__()
        self.role = role

    def format(self, record):
        message = record.getMessage()
        doc = {'time': self.formatTime(record, '%Y-%m-%dT%H:%M:%S') + '.%03d' % record.msecs,
               'level': record.levelname, 'role': self.role, 'pid': record.process, 'logger': record.name,
               'message': message}
        found = _SPEECH_ID.search(message)
        if found:
            doc['speechID'] = found.group(1)
        if record.exc_info:
            doc['exc'] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


_SPEECH_ID = re.compile(r'speechID=(\S+)')


def setup_logging(cfg: configobj.ConfigObj, name: str) -> None:
    """Point the root logger at this process's log file (or stderr); a forked child calls it again."""
    setting = cfg['setting']
    log_path = setting['log_path']
    if setting['log_to'] != 'stderr':
        os.makedirs(log_path, exist_ok=True)
    if setting['log_to'] == 'stderr':
        handler = logging.StreamHandler(sys.stderr)
    elif setting['mode'] == 'TEST':
        handler = logging.FileHandler(os.path.join(log_path, 'app.log'), mode='a', encoding='utf-8')
    else:
        # One file per process name, so no two processes ever rotate the same file.
        handler = logging.handlers.TimedRotatingFileHandler(
            os.path.join(log_path, f'{name}.log'), when='midnight', backupCount=31,
            encoding='utf-8')
    text = logging.Formatter(_LOG_FORMAT)
    handler.setFormatter(JsonFormatter(name) if setting['log_format'] == 'json' else text)

    root = logging.getLogger()
    # Handlers inherited over fork would keep writing to the parent's file.
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, setting['log_level'].upper()))


def reopen_logs() -> None:
    """Reopen every log file by name (SIGUSR1), so a file moved away by logrotate is recreated."""
    failed = []
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            os.makedirs(os.path.dirname(handler.baseFilename), exist_ok=True)
            stream = open(handler.baseFilename, 'a', encoding=handler.encoding,
                          errors=handler.errors)
        except OSError as exc:
            # Losing the log is worse than writing to the moved file: keep the old stream.
            failed.append((handler.baseFilename, exc))
            continue
        old = handler.setStream(stream)
        if old is not None:
            old.close()
    for filename, exc in failed:
        log.error('cannot reopen %s, still writing to the old file: %s', filename, exc)
