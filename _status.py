"""What the web process shows of the master: the Metrics sink (reporter thread) that counts
tasks by source and result and keeps histograms of queue wait, audio preparation and
recognition time, and snapshot(), built in the master's loop when the web process asks.
Counters live in the master, so a worker's restart does not reset them.
"""
import collections
import threading
import time

from _records import ACCEPTED, FINAL, STATE, stamp

# Seconds; the last bucket (+Inf) is implied.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
HISTOGRAMS = ('queue_wait', 'prepare', 'recognize')
MINUTES = 60
STARTED_MAX = 200000
# What Monitor (1003) may ask for besides all; `cluster` answers only in cluster mode.
MONITOR_PARTS = ('engine', 'task', 'cpu', 'memory', 'disk', 'cluster')


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        value = max(0.0, float(value))
        i = 0
        while i < len(BUCKETS) and value > BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def export(self):
        """{'buckets': [[le, cumulative count], ...] ending with '+Inf', 'sum', 'count'}."""
        out, total = [], 0
        for le, n in zip(list(BUCKETS) + ['+Inf'], self.counts):
            total += n
            out.append([le, total])
        return {'buckets': out, 'sum': round(self.sum, 6), 'count': self.count}


class Metrics:
    """A reporter sink (every event): runs in the reporter thread; export() in the master's loop."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted = collections.Counter()           # source -> tasks
        self.ended = collections.Counter()              # (source, result) -> tasks
        self.hist = {name: Histogram() for name in HISTOGRAMS}
        self.audio_seconds = 0.0
        self.recognize_seconds = 0.0
        self.started = {}                               # speechID -> {'created', 'CONVERT', 'RECOGNIZE'}
        self.minutes = collections.OrderedDict()        # minute (epoch // 60) -> [tasks, audio seconds]

    def handle(self, event, payload):
        with self.lock:
            if event == ACCEPTED:
                self.accepted[payload['source']] += 1
                if len(self.started) < STARTED_MAX:
                    self.started[payload['speechID']] = {'created': payload['created']}
            elif event == STATE:
                times = self.started.get(payload['speechID'])
                if times is not None:
                    times[payload['state']] = payload['at']
            elif event == FINAL:
                self._final(payload)

    def _final(self, record):
        times = self.started.pop(record.speech_id, {})
        self.ended[(record.source.value, record.result.value)] += 1
        convert, recognize = times.get('CONVERT'), times.get('RECOGNIZE')
        first = convert or recognize
        if first is not None:
            self.hist['queue_wait'].observe(first - record.created)
        if convert is not None and recognize is not None:
            self.hist['prepare'].observe(recognize - convert)
        if recognize is not None:
            secs = max(0.0, record.ended - recognize)
            self.hist['recognize'].observe(secs)
            if record.duration:
                self.recognize_seconds += secs
        if record.duration:
            self.audio_seconds += float(record.duration)
        minute = int(record.ended // 60)
        slot = self.minutes.setdefault(minute, [0, 0.0])
        slot[0] += 1
        slot[1] += float(record.duration or 0)
        while len(self.minutes) > MINUTES + 1:
            self.minutes.popitem(last=False)

    def export(self):
        with self.lock:
            now_min = int(time.time() // 60)
            return {
                'accepted': dict(self.accepted),
                'ended': [[src, res, n] for (src, res), n in sorted(self.ended.items())],
                'histograms': {name: h.export() for name, h in self.hist.items()},
                'audioSeconds': round(self.audio_seconds, 3),
                'recognizeSeconds': round(self.recognize_seconds, 3),
                'realTimeFactor': round(self.recognize_seconds / self.audio_seconds, 4) if self.audio_seconds else None,
                'perMinute': [[m * 60, n, round(a, 3)] for m, (n, a) in self.minutes.items()
                              if now_min - m < MINUTES],
            }


def task_rows(tasks, pool, cluster=None):
    """The tasks in progress, with the worker holding each; in cluster mode also those admitted
    here that wait for the cluster (the web keeps their uploads)."""
    rows = []
    for t in tasks.values():
        rows.append({'speechID': t.speech_id, 'state': t.state.value, 'source': t.source.value,
                     'startTime': stamp(t.created), 'created': t.created, 'worker': t.worker,
                     'fileID': t.request.get('fileID'), 'filePath': t.request.get('filePath')})
    if cluster is not None:
        rows += cluster.task_rows(exclude=tasks)
    return rows


def snapshot(master, metrics, tasks=True):
    """Everything the web process shows, from the master's own state (its loop calls this);
    without `tasks`, the list of tasks in progress is left out (/metrics needs only counts)."""
    snap = master.monitor.snapshot
    pool, table = master.pool, master.tasks
    pending = len(table.pending)
    workers = pool.describe()
    engine = {'name': master.engine.name, 'embedded': master.engine.embedded,
              'available': bool(master.engine_available())}
    if master.engine.embedded:
        engine.update(master.engine.describe())
    return {
        'time': time.time(), 'version': master.cfg['setting']['version'], 'pid': master.pid,
        'stopping': master.stopping, 'engine': engine, 'remoteEngines': master.broker.describe(),
        'workers': workers, 'workerProcesses': pool.size, 'workerRestarts': pool.restarts,
        'queue': {'pending': pending, 'running': len(table) - pending, 'maxTasks': table.max_tasks,
                  'records': master.reporter.depth()},
        'tasks': task_rows(table, pool, master.cluster) if tasks else None, 'counters': dict(master.counters),
        'metrics': metrics.export(),
        'outbox': master.webhook.status() if master.webhook else {'enabled': False},
        'db': master.db.stats() if master.db else {'enabled': False},
        'scanner': master.scanner.describe(), 'records': master.reporter.status(),
        'disk': snap['disk'], 'memory': snap['memory'], 'cpu': snap['cpu'],
        **({'cluster': master.cluster.describe()} if master.cluster is not None else {}),
    }


def monitor_body(master, kind='all'):
    """Monitor's (2003) answer: `kind` is all or one of MONITOR_PARTS."""
    snap = master.monitor.snapshot
    body = {'version': master.cfg['setting']['version']}
    if kind in ('all', 'engine'):
        body['engine'] = {'sttengine': master.engine_available()}
        if master.engine.embedded:
            body['engine'][master.engine.name] = master.engine.describe()
        body['engine'].update(master.broker.describe())
    if kind in ('all', 'task'):
        body['task'] = master.tasks.describe()
        if master.cluster is not None:
            # Tasks admitted here that wait for the cluster (queued, or running on another node).
            body['task'] += [{k: row[k] for k in ('speechID', 'startTime', 'state')}
                             for row in master.cluster.task_rows(exclude=master.tasks)]
    for part in ('disk', 'cpu', 'memory'):
        if kind in ('all', part):
            body[part] = snap[part]
    if kind in ('all', 'cluster') and master.cluster is not None:
        body['cluster'] = master.cluster.describe()
    if kind == 'all':
        pending = len(master.tasks.pending)
        body['workers'] = master.pool.describe()
        body['queue'] = {'pending': pending, 'running': len(master.tasks) - pending,
                         'maxTasks': master.tasks.max_tasks, 'records': master.reporter.depth()}
        body['counters'] = dict(master.counters)
        body['outbox'] = master.webhook.status() if master.webhook else {'enabled': False}
        body['db'] = master.db.stats() if master.db else {'enabled': False}
        body['scanner'] = master.scanner.describe()
        body['records'] = master.reporter.status()
        body['recent'] = master.tasks.describe_recent()
    return body
