"""A finished task's record (a records line) in the shapes HTTP clients ask for: OpenAI's
response formats (json, text, srt, vtt, verbose_json) and the task API's task object.
Segments come from the record when the worker gave them; otherwise one per channel.
"""
import json

import _segments

FORMATS = ('json', 'text', 'srt', 'vtt', 'verbose_json')
TEXT_TYPES = {'text': 'text/plain; charset=utf-8', 'srt': 'application/x-subrip; charset=utf-8',
              'vtt': 'text/vtt; charset=utf-8'}


def segments_of(line):
    """[{'start', 'end', 'text', 'channel'?}] of a records line, in time order."""
    found = line.get('segments')
    duration = float(line.get('duration') or 0.0)
    out = []
    stereo = len(line.get('channels') or []) > 1
    if isinstance(found, list) and found:
        for seg in found:
            if isinstance(seg, dict) and str(seg.get('text') or '').strip():
                item = {'start': float(seg.get('start') or 0.0), 'end': float(seg.get('end') or duration),
                        'text': str(seg['text']).strip()}
                if stereo and seg.get('channel'):      # a mono task's segments are all channel A
                    item['channel'] = seg['channel']
                out.append(item)
        out.sort(key=lambda s: (s['start'], s.get('channel') or ''))
        return out
    channels = line.get('channels') or []
    if len(channels) > 1:
        for ch in channels:
            text = str(ch.get('transcript') or '').strip()
            if text:
                out.append({'start': 0.0, 'end': duration, 'text': text, 'channel': ch.get('channel')})
        return out
    text = transcript_of(line).strip()
    return [{'start': 0.0, 'end': duration, 'text': text}] if text else []


def transcript_of(line):
    return str((line.get('data') or {}).get('transcript') or '')


def srt(line):
    segs = segments_of(line)
    return _segments.to_srt(segs, stereo=any(seg.get('channel') for seg in segs))


def vtt(line):
    segs = segments_of(line)
    return _segments.to_vtt(segs, stereo=any(seg.get('channel') for seg in segs))


def verbose_json(line, language, words=False):
    segs = []
    for i, seg in enumerate(segments_of(line)):
        item = {'id': i, 'seek': 0, 'start': seg['start'], 'end': seg['end'], 'text': seg['text'], 'tokens': [],
                'temperature': 0.0, 'avg_logprob': 0.0, 'compression_ratio': 0.0, 'no_speech_prob': 0.0}
        if seg.get('channel'):
            item['channel'] = seg['channel']
        segs.append(item)
    body = {'task': 'transcribe', 'language': language, 'duration': float(line.get('duration') or 0.0),
            'text': transcript_of(line), 'segments': segs, 'speechID': (line.get('data') or {}).get('speechID')}
    if line.get('channels'):
        body['channels'] = line['channels']
    if words:
        body['words'] = [w for w in (line.get('words') or []) if isinstance(w, dict)]
    return body


def render(line, fmt, language, granularities=()):
    """(content type, body bytes) of a finished task in OpenAI's `fmt`."""
    if fmt == 'text':
        body = transcript_of(line) + '\n'
    elif fmt == 'srt':
        body = srt(line)
    elif fmt == 'vtt':
        body = vtt(line)
    else:
        obj = verbose_json(line, language, 'word' in granularities) if fmt == 'verbose_json' \
            else {'text': transcript_of(line)}
        return 'application/json', json.dumps(obj, ensure_ascii=False).encode('utf-8')
    return TEXT_TYPES[fmt], body.encode('utf-8')


def task_object(line):
    """The task API's view of a finished task's records line."""
    data = line.get('data') or {}
    marks = {}
    for text in line.get('processInterval') or ():
        secs, _, mark = str(text).partition(' < ')
        try:
            marks[mark] = float(secs)
        except ValueError:
            continue
    out = {'speechID': data.get('speechID'), 'state': line.get('state'), 'result': str(data.get('result')),
           'source': line.get('source'), 'transcript': data.get('transcript') or '',
           'channels': line.get('channels') or [], 'duration': line.get('duration'),
           'startTime': line.get('startTime'), 'endTime': line.get('endTime'), 'timings': marks,
           'message': line.get('message'), 'done': True, 'file': _file_name(line.get('request') or {})}
    if line.get('segments'):
        out['segments'] = segments_of(line)
    return out


def running_object(row):
    """The task API's view of a task in progress (a row of the master's snapshot)."""
    return {'speechID': row['speechID'], 'state': row['state'], 'result': None, 'source': row['source'],
            'transcript': '', 'channels': [], 'duration': None, 'startTime': row['startTime'], 'endTime': None,
            'timings': {}, 'message': None, 'done': False, 'worker': row.get('worker'),
            'file': str(row.get('fileID') or '').split('__', 1)[-1]}


def _file_name(req):
    name = req.get('originalName') or req.get('fileName') or req.get('fileID') or ''
    return str(name).split('__', 1)[-1] if '__' in str(name) else str(name)
