"""The client commands of svcmgr.py: transcribe and monitor, spoken over the packet
protocol to the running daemon like any 1.0 client would."""
import json
import os
import socket
import sys

import _packet
from _packet import Type


def client_exchange(cfg, frames, expect, timeout):
    """Send frames to the running daemon and return `expect` answers (type, dict)."""
    host = cfg['server']['ip']
    if host in ('0.0.0.0', '::'):
        host = '127.0.0.1'
    sock = socket.create_connection((host, int(cfg['server']['port'])), timeout=10)
    sock.settimeout(timeout)
    for ptype, body in frames:
        sock.sendall(_packet.encode(ptype, body))
    decoder = _packet.FrameDecoder(64 << 20)
    answers = []
    while len(answers) < expect:
        data = sock.recv(1 << 16)
        if not data:
            break
        for ptype, body in decoder.feed(data):
            answers.append((ptype, json.loads(body.decode('utf-8'))))
    sock.close()
    return answers


def cmd_transcribe(cfg, files, keep, fmt='text'):
    frames = []
    for path in files:
        path = os.path.abspath(path)
        req = {'speechID': _packet.new_speech_id(), 'filePath': os.path.dirname(path),
               'fileID': os.path.basename(path), 'fileName': os.path.basename(path)}
        if keep:
            req['keepSource'] = True
        if fmt != 'text':
            req['segments'] = True
        frames.append((Type.TRANSCRIBE, req))
    timeout = float(cfg['setting']['session_timeout_secs']) + 30
    try:
        answers = client_exchange(cfg, frames, len(frames), timeout)
    except OSError as exc:
        print('svcmgr: cannot reach the daemon at %s:%s: %s' % (cfg['server']['ip'], cfg['server']['port'], exc),
              file=sys.stderr)
        return 1
    names = {req['speechID']: os.path.join(req['filePath'], req['fileID']) for _, req in frames}
    worst = 0
    for _, body in answers:
        name = names.get(body.get('speechID'), body.get('speechID'))
        if body.get('result') == '0' and fmt != 'text':
            print_answer(body, name, fmt, len(frames) > 1)
        elif body.get('result') == '0':
            print('%s\t%s' % (name, body.get('transcript', '').replace('\n', '\n\t')))
        else:
            worst = 1
            print('%s\tERROR %s %s: %s' % (name, body.get('result'), body.get('state'), body.get('message')))
    if len(answers) < len(frames):
        print('svcmgr: the daemon answered %d of %d requests' % (len(answers), len(frames)), file=sys.stderr)
        worst = 1
    return worst


def print_answer(body, name, fmt, several):
    """One file's answer as JSON (a line each) or as SRT/WebVTT (headed by its name when
    several files were sent, so one file's subtitle can be redirected as it is)."""
    if fmt == 'json':
        print(json.dumps(dict(body, file=name), ensure_ascii=False))
        return
    import _segments
    if several:
        print('==> %s <==' % name)
    print(_segments.RENDER[fmt](body.get('segments') or [], stereo=len(body.get('channels') or ()) > 1), end='')


def cmd_monitor(cfg, kind):
    try:
        answers = client_exchange(cfg, [(Type.MONITOR, {'type': kind})], 1, 10)
    except OSError as exc:
        print('svcmgr: cannot reach the daemon: %s' % exc, file=sys.stderr)
        return 1
    if not answers:
        return 1
    print(json.dumps(answers[0][1], indent=2, ensure_ascii=False))
    return 0
