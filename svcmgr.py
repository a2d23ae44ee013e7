#!/usr/bin/env python3
"""svcmgr, the Service Manager for batch speech-to-text: the command line. The daemon
commands live in _daemon.py, the master in _master.py, the client commands in _client.py;
each command imports only what it needs, so `status` and `stop` start fast.
"""
import argparse
import os
import sys

import _config

__version__ = '2.1.0'
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INI = os.path.join(HERE, 'app.ini')
MONITOR_PARTS = ('all', 'engine', 'task', 'cpu', 'memory', 'disk', 'cluster')


def parser():
    p = argparse.ArgumentParser(prog='svcmgr', description='svcmgr, the Service Manager for batch STT')
    p.add_argument('--version', action='version', version='svcmgr %s' % __version__)
    p.add_argument('-c', '--config', default=None,
                   help='app.ini to use (default: $SVCMGR_CONFIG, else the one beside svcmgr.py, else ./app.ini)')
    sub = p.add_subparsers(dest='command', required=True)
    for name, text in (('start', 'start the daemon'), ('stop', 'stop the daemon gracefully'),
                       ('restart', 'stop, then start'), ('status', 'show the master and its children'),
                       ('reload', 'reload app.ini (SIGHUP)'), ('run', 'run in the foreground (systemd)')):
        sub.add_parser(name, help=text)
    transcribe_parser(sub)
    m = sub.add_parser('monitor', help='print the Monitor answer')
    m.add_argument('--type', default='all', choices=MONITOR_PARTS)
    w = sub.add_parser('webhook', help='the webhook outbox (works on its files, running or not)')
    wsub = w.add_subparsers(dest='webhook_command', required=True)
    wl = wsub.add_parser('list', help='pending and failed deliveries with attempts and last error')
    wl.add_argument('--json', action='store_true', help='print JSON')
    wr = wsub.add_parser('redeliver', help='put failed deliveries back into the outbox, attempts reset')
    wr.add_argument('speech_ids', nargs='*', metavar='speechID')
    wr.add_argument('--all-failed', action='store_true', help='every entry in records/webhook/failed/')
    d = sub.add_parser('db', help='the MySQL database of [db]: init applies schema.sql, check verifies it')
    d.add_argument('db_command', choices=('init', 'check'))
    c = sub.add_parser('cluster', help='cluster mode: every node, alive or dead, and the queue')
    c.add_argument('cluster_command', choices=('status',))
    c.add_argument('--json', action='store_true', help='print JSON')
    return p


def transcribe_parser(sub):
    t = sub.add_parser('transcribe', help='send files and folders to the running daemon; print or write the results',
                       description='Files are sent as the daemon has room (never a result 6); results are printed '
                                   'as they arrive. Exit 0 when every file gave 0, 1 when any failed, 2 when there '
                                   'was nothing to send, 3 when the daemon cannot be reached.')
    t.add_argument('paths', nargs='+', metavar='PATH', help='audio files, or folders walked recursively')
    t.add_argument('--glob', metavar='PATTERN',
                   help='file names to take in folders (default: [directory] scan_extensions)')
    t.add_argument('--format', choices=('text', 'json', 'srt', 'vtt'), default='text',
                   help='text (default), json, srt or vtt (one cue per call until the engine gives segments)')
    where = t.add_mutually_exclusive_group()
    where.add_argument('--out', metavar='DIR', help='write one <name>.<format> per file under DIR')
    where.add_argument('--beside', action='store_true', help='write <name>.<format> beside each input')
    t.add_argument('--jobs', type=int, metavar='N',
                   help='files in flight at once (default: 2 per worker, never above the free max_tasks)')
    t.add_argument('--keep', action='store_true', help='keep the source files (the default)')
    t.add_argument('--delete-source', action='store_true',
                   help='let [task] source_after decide, which deletes a source after success by default')
    bar = t.add_mutually_exclusive_group()
    bar.add_argument('--progress', action='store_true', default=None, help='show the progress line even off a terminal')
    bar.add_argument('--no-progress', dest='progress', action='store_false', help='never show the progress line')
    t.add_argument('-q', '--quiet', action='store_true', help='print errors only (and the summary)')


def default_config():
    """$SVCMGR_CONFIG, else app.ini beside svcmgr.py (a source tree), else ./app.ini (an installed svcmgr)."""
    env = os.environ.get('SVCMGR_CONFIG')
    if env:
        return env
    if os.path.isfile(DEFAULT_INI):
        return DEFAULT_INI
    return os.path.join(os.getcwd(), 'app.ini')


def load_config(cfg_path, command):
    """The validated app.ini; for stop and status a broken one falls back to its pidfile."""
    try:
        return _config.load(cfg_path)
    except _config.ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        if command not in ('stop', 'status'):
            return None
    import _daemon
    # A daemon started from a good app.ini must stay stoppable after the file was broken.
    cfg = _daemon.fallback_cfg(cfg_path)
    print('svcmgr: using pidfile %s' % cfg['setting']['pidfile'], file=sys.stderr)
    return cfg


def run(args, cfg, cfg_path):
    command = args.command
    if command in ('start', 'run', 'stop', 'restart', 'status', 'reload'):
        import _daemon
        if command == 'restart':
            _daemon.cmd_stop(cfg, quiet=True)
        if command in ('start', 'run', 'restart'):
            return _daemon.cmd_start(cfg, cfg_path, foreground=command == 'run')
        if command == 'stop':
            return _daemon.cmd_stop(cfg)
        if command == 'status':
            return _daemon.cmd_status(cfg)
        return _daemon.cmd_reload(cfg, cfg_path)
    if command in ('transcribe', 'monitor'):
        import _client
        if command == 'transcribe':
            return _client.cmd_transcribe(cfg, args)
        return _client.cmd_monitor(cfg, args.type)
    if command == 'webhook':
        import _webhook
        if args.webhook_command == 'list':
            return _webhook.cmd_list(cfg, args.json)
        return _webhook.cmd_redeliver(cfg, args.speech_ids, args.all_failed)
    if command == 'cluster':
        import _cluster_db
        return _cluster_db.cmd_status(cfg, args.json)
    import _db
    return _db.command(cfg, args.db_command, os.path.join(_config.base_dir(cfg), 'records'))


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.command == 'webhook' and args.webhook_command == 'redeliver' \
            and bool(args.speech_ids) == bool(args.all_failed):
        p.error('webhook redeliver takes speechIDs or --all-failed')
    if args.command == 'transcribe' and args.jobs is not None and args.jobs < 1:
        p.error('--jobs must be 1 or more')
    cfg_path = os.path.abspath(args.config or default_config())
    cfg = load_config(cfg_path, args.command)
    if cfg is None:
        return 2
    return run(args, cfg, cfg_path)


if __name__ == '__main__':
    sys.exit(main())
