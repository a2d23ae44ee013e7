"""/metrics: the master's snapshot in Prometheus text format (prometheus-client's families and
exposition). Nothing is kept here: every scrape reads the master's counters, so they survive
a worker's or the web process's restart and reset only with the master.
"""
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
HISTOGRAMS = (('queue_wait', 'svcmgr_queue_wait_seconds', 'Seconds from admission until a worker took the task'),
              ('prepare', 'svcmgr_audio_prepare_seconds', 'Seconds a worker spent decoding and converting the audio'),
              ('recognize', 'svcmgr_recognition_seconds', 'Seconds the engine spent recognizing the task'))


def gauge(name, doc, value, labels=None):
    g = GaugeMetricFamily(name, doc, labels=sorted(labels) if labels else None)
    if labels:
        for key, v in value:
            g.add_metric(list(key), v)
    else:
        g.add_metric([], value)
    return g


def counter(name, doc, value, labels=None):
    c = CounterMetricFamily(name, doc, labels=labels)
    if labels:
        for key, v in value:
            c.add_metric(list(key), v)
    else:
        c.add_metric([], value)
    return c


def families(snap):
    m = snap['metrics']
    yield counter('svcmgr_tasks_accepted', 'Tasks admitted, by source', sorted(((s,), n) for s, n in m['accepted'].items()),
                  ['source'])
    yield counter('svcmgr_tasks', 'Tasks ended (one record each), by source and result',
                  [((src, res), n) for src, res, n in m['ended']], ['source', 'result'])
    yield counter('svcmgr_requests_rejected', 'Transcribe requests refused before they became a task',
                  snap['counters'].get('rejected', 0))
    for key, name, doc in HISTOGRAMS:
        h = m['histograms'][key]
        buckets = [('+Inf' if le == '+Inf' else repr(float(le)), n) for le, n in h['buckets']]
        yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h['sum'])
    yield counter('svcmgr_audio_seconds', 'Seconds of audio in tasks that ended', m['audioSeconds'])
    yield counter('svcmgr_recognized_audio_busy_seconds', 'Engine seconds spent on tasks with a known duration',
                  m['recognizeSeconds'])
    yield gauge('svcmgr_real_time_factor', 'Engine seconds per second of audio since the master started',
                m['realTimeFactor'] if m['realTimeFactor'] is not None else float('nan'))
    q = snap['queue']
    yield gauge('svcmgr_queue_depth', 'Tasks admitted and waiting for a worker', q['pending'])
    yield gauge('svcmgr_tasks_running', 'Tasks a worker or an engine holds', q['running'])
    yield gauge('svcmgr_max_tasks', 'max_tasks: tasks queued or running at once', q['maxTasks'])
    workers = snap['workers']
    yield gauge('svcmgr_workers_alive', 'PacketAgent worker processes alive', len(workers))
    yield gauge('svcmgr_workers_busy', 'Workers holding a task', sum(1 for w in workers if w.get('speechID')))
    yield gauge('svcmgr_workers_configured', 'worker_processes', snap['workerProcesses'])
    yield counter('svcmgr_worker_restarts', 'Worker processes respawned after they died', snap['workerRestarts'])
    yield gauge('svcmgr_engine_available', '1 when an engine can take tasks', 1 if snap['engine']['available'] else 0)
    yield gauge('svcmgr_remote_engines_logged_in', 'Legacy engines logged in', len(snap['remoteEngines']))
    sc = snap['scanner']
    yield gauge('svcmgr_scanner_backlog', 'Files the scanner has claimed or seen waiting and not yet submitted',
                (sc.get('claimed') or 0) + (sc.get('waiting') or 0))
    ob = snap['outbox']
    yield gauge('svcmgr_webhook_outbox_pending', 'Webhook deliveries waiting in the outbox', ob.get('pending', 0))
    yield counter('svcmgr_webhook_failed', 'Webhook deliveries given up (moved to failed/) since the master started',
                  ob.get('failed', 0))
    yield gauge('svcmgr_db_spool_depth', 'Database rows waiting in the spool file', snap['db'].get('spooled', 0))
    yield gauge('svcmgr_records_queue', 'Events waiting for the reporter thread', q['records'])


class _Snapshot:
    def __init__(self, snap):
        self.snap = snap

    def collect(self):
        return families(self.snap)


def exposition(snap):
    return generate_latest(_Snapshot(snap))
