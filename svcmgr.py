#!/usr/bin/env python3
"""svcmgr, the Service Manager for batch speech-to-text: the command line. The daemon
commands live in _daemon.py, the master in _master.py, the client commands in _client.py;
each command imports only what it needs, so `status` and `stop` start fast.
"""
import argparse
import os
import sys

import _config

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INI = os.path.join(HERE, 'app.ini')
MONITOR_PARTS = ('all', 'engine', 'task', 'cpu', 'memory', 'disk')


def parser():
    p = argparse.ArgumentParser(prog='svcmgr.py', description='svcmgr, the Service Manager for batch STT')
    p.add_argument('-c', '--config', default=DEFAULT_INI, help='app.ini to use (default: beside svcmgr.py)')
    sub = p.add_subparsers(dest='command', required=True)
    for name, text in (('start', 'start the daemon'), ('stop', 'stop the daemon gracefully'),
                       ('restart', 'stop, then start'), ('status', 'show the master and its children'),
                       ('reload', 'reload app.ini (SIGHUP)'), ('run', 'run in the foreground (systemd)')):
        sub.add_parser(name, help=text)
    t = sub.add_parser('transcribe', help='send files to the running daemon and print the transcripts')
    t.add_argument('files', nargs='+')
    t.add_argument('--keep', action='store_true', help='keep the source files (default: as app.ini says)')
    t.add_argument('--format', default='text', choices=('text', 'json', 'srt', 'vtt'),
                   help='text: the transcripts; json: each answer with its segments, a line each; '
                        'srt, vtt: subtitles of the segments')
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
    return p


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
            return _client.cmd_transcribe(cfg, args.files, args.keep, args.format)
        return _client.cmd_monitor(cfg, args.type)
    if command == 'webhook':
        import _webhook
        if args.webhook_command == 'list':
            return _webhook.cmd_list(cfg, args.json)
        return _webhook.cmd_redeliver(cfg, args.speech_ids, args.all_failed)
    import _db
    return _db.command(cfg, args.db_command, os.path.join(_config.base_dir(cfg), 'records'))


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.command == 'webhook' and args.webhook_command == 'redeliver' \
            and bool(args.speech_ids) == bool(args.all_failed):
        p.error('webhook redeliver takes speechIDs or --all-failed')
    cfg_path = os.path.abspath(args.config)
    cfg = load_config(cfg_path, args.command)
    if cfg is None:
        return 2
    return run(args, cfg, cfg_path)


if __name__ == '__main__':
    sys.exit(main())
