"""A task's segments: the engine's utterances of every channel as one list ordered by start
time, `{seq, channel, start, end, text, confidence, lowConfidence, words}`, their mean
confidence, and their renderings as SRT and WebVTT subtitles (through the srt and webvtt-py
packages, imported only when a subtitle is made).
"""
import datetime

# Times in seconds and confidences are kept to the millisecond / the thousandth.
TIME_DIGITS = 3
CONF_DIGITS = 3
SUBTITLE_FORMATS = ('srt', 'vtt')


def _conf(value):
    return None if value is None else round(float(value), CONF_DIGITS)


def build(recognitions, low_confidence=0.0):
    """Segments of [(channel label, Recognition)], ordered by start time across channels
    (then by channel), numbered from 1; a segment whose confidence is below
    `low_confidence` has lowConfidence true."""
    found = []
    for label, rec in recognitions:
        for u in rec.utterances:
            found.append((round(u.start, TIME_DIGITS), label, u))
    found.sort(key=lambda item: (item[0], item[1]))
    segments = []
    for seq, (start, label, u) in enumerate(found, 1):
        confidence = _conf(u.confidence)
        segments.append({
            'seq': seq, 'channel': label, 'start': start, 'end': round(u.end, TIME_DIGITS),
            'text': u.text, 'confidence': confidence,
            'lowConfidence': confidence is not None and confidence < low_confidence,
            'words': [{'word': w.word, 'start': round(w.start, TIME_DIGITS), 'end': round(w.end, TIME_DIGITS),
                       'confidence': _conf(w.confidence)} for w in u.words]})
    return segments


def _number(value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError('not a number: %r' % (value,))
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError('out of range: %r' % (value,))
    return float(value)


def _engine_word(w):
    conf = w.get('confidence', w.get('conf'))
    return {'word': str(w['word']), 'start': round(_number(w['start'], 0), TIME_DIGITS),
            'end': round(_number(w['end'], 0), TIME_DIGITS),
            'confidence': None if conf is None else _conf(_number(conf, 0, 1))}


def from_engine(raw, low_confidence=0.0):
    """Segments a legacy engine sent in its 4001 (`segments`: [{channel, start, end, text,
    confidence, words}], `result` accepted for `text` as 1.0 named it), checked and put in
    our form; ValueError (or KeyError, TypeError) when they are not usable."""
    if not isinstance(raw, list):
        raise ValueError('segments is not a list')
    found = []
    for s in raw:
        text = s.get('text', s.get('result', ''))
        channel = s.get('channel') or 'A'
        if channel not in ('A', 'B') or not isinstance(text, str):
            raise ValueError('bad channel or text in %r' % (s,))
        start, end = _number(s['start'], 0), _number(s['end'], 0)
        conf = s.get('confidence')
        conf = None if conf is None else _conf(_number(conf, 0, 1))
        found.append((round(start, TIME_DIGITS), channel, round(max(start, end), TIME_DIGITS), text, conf,
                      [_engine_word(w) for w in s.get('words') or ()]))
    found.sort(key=lambda item: (item[0], item[1]))
    return [{'seq': seq, 'channel': channel, 'start': start, 'end': end, 'text': text, 'confidence': conf,
             'lowConfidence': conf is not None and conf < low_confidence, 'words': words}
            for seq, (start, channel, end, text, conf, words) in enumerate(found, 1)]


def mean_confidence(segments):
    """The task's confidence: the mean of its words' confidences, or of its segments' when
    no word has one (None without any)."""
    values = [w['confidence'] for s in segments or () for w in s.get('words') or ()
              if w.get('confidence') is not None]
    if not values:
        values = [s['confidence'] for s in segments or () if s.get('confidence') is not None]
    return round(sum(values) / len(values), CONF_DIGITS) if values else None


def _caption_text(segment, stereo):
    return '%s: %s' % (segment['channel'], segment['text']) if stereo else segment['text']


def _stereo(segments):
    return len({s['channel'] for s in segments}) > 1


def _delta(secs):
    # Whole milliseconds: srt truncates, so 2.3 s (2.29999...) would be written as 2,299.
    return datetime.timedelta(milliseconds=int(round(secs * 1000)))


def to_srt(segments, stereo=None):
    """SubRip text of the segments; with two channels each cue starts with "A: " or "B: "."""
    import srt
    stereo = _stereo(segments) if stereo is None else stereo
    subs = [srt.Subtitle(index=i, start=_delta(s['start']), end=_delta(s['end']),
                         content=_caption_text(s, stereo))
            for i, s in enumerate(segments, 1)]
    return srt.compose(subs, reindex=False)


def _vtt_time(secs):
    ms = int(round(secs * 1000))
    return '%02d:%02d:%02d.%03d' % (ms // 3600000, ms // 60000 % 60, ms // 1000 % 60, ms % 1000)


def to_vtt(segments, stereo=None):
    """WebVTT text of the segments, speaker prefix as in to_srt()."""
    import webvtt
    stereo = _stereo(segments) if stereo is None else stereo
    vtt = webvtt.WebVTT()
    for s in segments:
        vtt.captions.append(webvtt.Caption(_vtt_time(s['start']), _vtt_time(s['end']), _caption_text(s, stereo)))
    return vtt.content


RENDER = {'srt': to_srt, 'vtt': to_vtt}
