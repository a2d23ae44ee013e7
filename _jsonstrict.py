"""Strict JSON in and out. What svcmgr reads from a request and writes anywhere (answers,
records, webhook bodies, spools, database rows) is JSON as RFC 8259 has it: no NaN, no
Infinity (`1e999` included), no nesting deeper than MAX_DEPTH. Imports nothing of svcmgr.
"""
import json
import math

# Deeper than any real request; deep enough bodies exhaust the parser's and the encoder's stack.
MAX_DEPTH = 64


def _refuse_constant(name):
    raise ValueError('%s is not a JSON number' % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError('number %s is out of range' % (text[:40],))
    return value


def depth_over(value, limit=MAX_DEPTH):
    """True when `value` nests arrays and objects more than `limit` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def loads(text):
    """Parse `text` strictly; ValueError (with a reason) for NaN, Infinity, numbers out of
    range, nesting deeper than MAX_DEPTH or anything that is not JSON."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError('nested more than %d levels deep' % MAX_DEPTH) from None
    # Only a text with that many brackets can nest that deep: most bodies skip the walk.
    if text.count('[') + text.count('{') > MAX_DEPTH and depth_over(value):
        raise ValueError('nested more than %d levels deep' % MAX_DEPTH)
    return value


def finite(value):
    """`value` with NaN and infinities replaced by None (null), at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kw):
    """json.dumps with allow_nan=False; a non-finite number that got this far is written as null."""
    kw['allow_nan'] = False
    try:
        return json.dumps(value, **kw)
    except ValueError:
        return json.dumps(finite(value), **kw)
