"""Cluster mode's state in MariaDB: the cluster_task rows (a speechID unique across nodes, who
runs it, its answer once final) and the cluster_node heartbeats, on the database's own clock.
Plain functions over a PyMySQL connection, used by the cluster thread and `svcmgr.py cluster`.
"""
import json
import logging
import sys

import pymysql

import _db

log = logging.getLogger('cluster')

QUEUED, RUNNING, FINAL = 'queued', 'running', 'final'
# What the thread does with a delivered task, as take() decides it.
RUN, HOLD, ANSWERED, DROP, DEAD = 'run', 'hold', 'answered', 'drop', 'dead'

# A final row is taken over by the next task of the same speechID; any other row refuses it.
# MariaDB assigns left to right, each IF seeing the row as the earlier ones left it: state last.
_TAKE_OVER = ', '.join('%s = IF(state = \'final\', VALUES(%s), %s)' % (c, c, c) for c in (
    'token', 'origin_node', 'origin_token', 'message', 'run_node', 'run_token', 'attempts', 'source', 'answer',
    'created_at'))
_INSERT_HEAD = ('INSERT INTO cluster_task (speech_id, token, origin_node, origin_token, message, run_node, run_token,'
                ' state, attempts, source, answer, created_at) VALUES ')
_INSERT_ROW = '(%s, %s, %s, %s, %s, NULL, NULL, \'queued\', 0, %s, NULL, NOW(6))'
_INSERT_TAIL = {False: ' ON DUPLICATE KEY UPDATE ' + _TAKE_OVER + ', state = IF(state = \'final\', \'queued\', state)',
                True: ' ON DUPLICATE KEY UPDATE speech_id = speech_id'}
INSERT_SQL = _INSERT_HEAD + _INSERT_ROW + _INSERT_TAIL[False]
SCANNED_SQL = _INSERT_HEAD + _INSERT_ROW + _INSERT_TAIL[True]
TOKENS_SQL = 'SELECT speech_id, token FROM cluster_task WHERE speech_id IN (%s)'
# Queued rows whose entering life is gone (it died before publishing, or the message was lost with
# it): a live node claims them (origin = itself) and publishes their message again.
ORPHANS_SQL = ('SELECT t.speech_id, t.token, t.origin_node, t.origin_token, t.message FROM cluster_task t'
               ' WHERE t.state = \'queued\' AND t.message IS NOT NULL AND t.origin_token IS NOT NULL'
               ' AND t.updated_at < NOW(6) - INTERVAL %s MICROSECOND AND NOT EXISTS (SELECT 1 FROM cluster_node n'
               ' WHERE n.node = t.origin_node AND n.token = t.origin_token AND n.status = \'running\''
               ' AND n.alive_at > NOW(6) - INTERVAL %s MICROSECOND) LIMIT 200')
ADOPT_SQL = ('UPDATE cluster_task SET origin_node = %s, origin_token = %s WHERE speech_id = %s AND token = %s'
             ' AND state = \'queued\' AND origin_node = %s AND origin_token = %s')
# Whether a queued row was left by a dead node (or an earlier life of this one) before it published.
ENTERED_SQL = ('SELECT t.token, t.state, t.answer, t.origin_node = %s OR (t.updated_at < NOW(6) - INTERVAL %s'
               ' MICROSECOND AND NOT EXISTS (SELECT 1 FROM cluster_node n WHERE n.node = t.origin_node'
               ' AND n.status = \'running\' AND n.alive_at > NOW(6) - INTERVAL %s MICROSECOND))'
               ' FROM cluster_task t WHERE t.speech_id = %s')
STALE_SQL = ('UPDATE cluster_task SET token = %s, origin_node = %s WHERE speech_id = %s AND token = %s'
             ' AND state = \'queued\'')
ROW_SQL = ('SELECT token, state, run_node, run_token, attempts, answer FROM cluster_task'
           ' WHERE speech_id = %s FOR UPDATE')
NODE_SQL = ('SELECT token, status, alive_at > NOW(6) - INTERVAL %s MICROSECOND AS fresh FROM cluster_node'
            ' WHERE node = %s')
RUN_SQL = ('UPDATE cluster_task SET state = \'running\', run_node = %s, run_token = %s, attempts = attempts + 1'
           ' WHERE speech_id = %s AND token = %s')
# The common case in one statement: a queued task not yet started `limit` times is this node's now.
QUEUED_SQL = ('SELECT speech_id, token FROM cluster_task WHERE speech_id IN (%s) AND state = \'queued\''
              ' AND attempts < %%s FOR UPDATE')
TAKE_MANY_SQL = ('UPDATE cluster_task SET state = \'running\', run_node = %%s, run_token = %%s,'
                 ' attempts = attempts + 1 WHERE speech_id IN (%s)')
FINAL_MANY_SQL = ('UPDATE cluster_task SET answer = CASE speech_id %s END, state = \'final\''
                  ' WHERE speech_id IN (%s) AND state <> \'final\' AND token = CASE speech_id %s END')
TAKE_FAST_SQL = ('UPDATE cluster_task SET state = \'running\', run_node = %s, run_token = %s,'
                 ' attempts = attempts + 1 WHERE speech_id = %s AND token = %s AND state = \'queued\''
                 ' AND attempts < %s')
UNRUN_SQL = ('UPDATE cluster_task SET state = \'queued\', attempts = GREATEST(attempts, 1) - 1'
             ' WHERE speech_id = %s AND token = %s AND run_token = %s AND state = \'running\'')
FINAL_SQL = ('UPDATE cluster_task SET state = \'final\', answer = %s WHERE speech_id = %s AND token = %s'
             ' AND state <> \'final\'')
FORGET_SQL = 'DELETE FROM cluster_task WHERE speech_id = %s AND token = %s AND state = \'queued\''
HEARTBEAT_SQL = ('INSERT INTO cluster_node (node, token, pid, status, broker_up, capacity, running, waiting,'
                 ' started_at, alive_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NOW(6), NOW(6))'
                 ' ON DUPLICATE KEY UPDATE started_at = IF(token = VALUES(token), started_at, NOW(6)),'
                 ' token = VALUES(token), pid = VALUES(pid), status = VALUES(status),'
                 ' broker_up = VALUES(broker_up), capacity = VALUES(capacity), running = VALUES(running),'
                 ' waiting = VALUES(waiting), alive_at = NOW(6)')
# Who holds a node name now: its life, its status, its heartbeat (as written, and its age).
NAME_SQL = ('SELECT token, status, alive_at, TIMESTAMPDIFF(MICROSECOND, alive_at, NOW(6)) / 1e6'
            ' FROM cluster_node WHERE node = %s')
NODES_SQL = ('SELECT c.node, c.status, c.pid, c.broker_up, c.capacity, c.running, c.waiting,'
             ' c.alive_at > NOW(6) - INTERVAL %s MICROSECOND AS fresh,'
             ' TIMESTAMPDIFF(MICROSECOND, c.alive_at, NOW(6)) / 1e6 AS age,'
             ' s.engine_type, s.engine_up, s.workers, s.tasks_running, s.tasks_queued, s.max_tasks, s.cpu_percent'
             ' FROM cluster_node c LEFT JOIN node_status s ON s.node = c.node ORDER BY c.node')
COUNTS_SQL = 'SELECT state, COUNT(*) FROM cluster_task WHERE state <> \'final\' GROUP BY state'
TABLES = ('cluster_task', 'cluster_node')


def connect(cfg):
    return pymysql.connect(**_db.connect_params(cfg))


def ensure_tables(conn):
    """Create cluster_task and cluster_node when missing (schema.sql's statements; idempotent)."""
    with conn.cursor() as cur:
        for stmt in _db.schema_statements():
            if any(('TABLE IF NOT EXISTS %s ' % t) in stmt for t in TABLES):
                cur.execute(stmt)


def micros(secs):
    return int(secs * 1e6)


def orphans(conn, node, node_token, dead_secs):
    """The messages of queued rows left by dead lives, each now claimed by this node (and so not
    taken again by another before node_dead_secs have passed)."""
    with conn.cursor() as cur:
        cur.execute(ORPHANS_SQL, (micros(dead_secs), micros(dead_secs)))
        out = []
        for sid, token, origin, origin_token, message in cur.fetchall():
            cur.execute(ADOPT_SQL, (node, node_token, sid, token, origin, origin_token))
            if cur.rowcount == 1:
                out.append((sid, message))
    return out


def insert(conn, sid, token, node, source, dead_secs, node_token=None, message=None):
    """Enter a new task: (True, None), or (False, answer) when a task of this speechID is in
    progress somewhere (answer None) or, for a scanned file, already final (its answer).

    A scanned file's speechID names that one claimed file, so a final row is never taken over:
    the file is done and only has to be moved out. A row still queued long after a dead node
    entered it (it died before publishing) is taken over: a message of the old token, if one
    was published after all, finds the row is not its own and is dropped."""
    scanned = source == 'scanner'
    with conn.cursor() as cur:
        cur.execute(SCANNED_SQL if scanned else INSERT_SQL, (sid, token, node, node_token, message, source))
        if cur.rowcount in (1, 2):
            # Inserted (1), or a final row taken over (2, an upsert's count for a changed row): ours.
            # 0: a row in progress (or final, for a scanned file) stays as it was; it says why below.
            return True, None
        cur.execute(ENTERED_SQL, (node, micros(dead_secs), micros(dead_secs), sid))
        row = cur.fetchone()
        if row is None or row[0] == token:
            return row is not None, None
        entered, state, answer, stale = row
        if scanned and state == QUEUED and stale:
            cur.execute(STALE_SQL, (token, node, sid, entered))
            return cur.rowcount == 1, None
    return False, answer if scanned and state == FINAL else None


def marks(n):
    return ', '.join(['%s'] * n)


def insert_many(conn, tasks, node, dead_secs, node_token):
    """insert() for many tasks, [(sid, token, source, message)], in two statements when every row
    is new (the common case); a task whose row is not its own after them goes through insert()
    to learn why. Returns [(entered, answer)] in order."""
    if len(tasks) < 2:
        return [insert(conn, sid, token, node, source, dead_secs, node_token, message)
                for sid, token, source, message in tasks]
    with conn.cursor() as cur:
        for scanned in (False, True):
            group = [t for t in tasks if (t[2] == 'scanner') == scanned]
            if group:
                cur.execute(_INSERT_HEAD + ', '.join([_INSERT_ROW] * len(group)) + _INSERT_TAIL[scanned],
                            [v for sid, token, source, message in group
                             for v in (sid, token, node, node_token, message, source)])
        cur.execute(TOKENS_SQL % marks(len(tasks)), [t[0] for t in tasks])
        tokens = dict(cur.fetchall())
    return [(True, None) if tokens.get(sid) == token else
            insert(conn, sid, token, node, source, dead_secs, node_token, message)
            for sid, token, source, message in tasks]


def take_many(conn, tasks, me, my_token, limit):
    """take_fast() for many delivered tasks, [(sid, token)], under one lock of their rows:
    [True] for each that was queued and is this node's now (a second delivery of the same one in
    the batch: False, and take() decides it)."""
    if len(tasks) < 2:
        return [take_fast(conn, sid, token, me, my_token, limit) for sid, token in tasks]
    sids = sorted({sid for sid, _ in tasks})
    with conn.cursor() as cur:
        cur.execute(QUEUED_SQL % marks(len(sids)), sids + [limit])
        queued = set(cur.fetchall())
        out, taken = [], set()
        for task in tasks:
            fast = task in queued and task[0] not in taken
            if fast:
                taken.add(task[0])
            out.append(fast)
        if taken:
            cur.execute(TAKE_MANY_SQL % marks(len(taken)), [me, my_token] + sorted(taken))
    return out


def finish_many(conn, tasks):
    """finish() for many tasks, [(sid, token, answer, task_row)]: their rows final in one
    statement, their task rows in one more (one by one if the database refuses that)."""
    if len(tasks) < 2:
        for sid, token, answer, row in tasks:
            finish(conn, sid, token, answer, row)
        return
    when = ' '.join(['WHEN %s THEN %s'] * len(tasks))
    answers = [v for sid, _, answer, _ in tasks for v in (sid, json.dumps(answer, ensure_ascii=False))]
    tokens = [v for sid, token, _, _ in tasks for v in (sid, token)]
    rows = [row for _, _, _, row in tasks if row is not None]
    with conn.cursor() as cur:
        cur.execute(FINAL_MANY_SQL % (when, marks(len(tasks)), when), answers + [t[0] for t in tasks] + tokens)
        if len({sql for sql, _ in rows}) == 1:
            try:
                cur.execute('SAVEPOINT task_rows')
                cur.executemany(rows[0][0], [params for _, params in rows])     # one multi-row upsert
                return
            except _db.POISON as exc:
                cur.execute('ROLLBACK TO SAVEPOINT task_rows')
                log.warning('cluster: %d final task rows refused together (%s); one by one', len(rows), exc)
        for sid, _, _, row in tasks:
            _task_row(cur, sid, row)


def atomic(conn, fn, *args):
    """fn(conn, *args) in one transaction: its statements commit together, with one fsync."""
    conn.begin()
    try:
        out = fn(conn, *args)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return out


def take_fast(conn, sid, token, me, my_token, limit):
    """True when the task was queued and is this node's now (else take() decides)."""
    with conn.cursor() as cur:
        cur.execute(TAKE_FAST_SQL, (me, my_token, sid, token, limit))
        return cur.rowcount == 1


def forget(conn, sid, token):
    """A task that never reached the broker (a stop) leaves no row behind."""
    with conn.cursor() as cur:
        cur.execute(FORGET_SQL, (sid, token))


def take(conn, sid, token, me, my_token, dead_secs, limit):
    """What to do with a delivered task, decided under the row's lock:
    (RUN, (attempts, dead_node)) this node runs it now (dead_node: whose run of it died, if any);
    (ANSWERED, answer) it is final already;
    (HOLD, run_node) a live node runs it (its broker connection was cut): wait;
    (DEAD, attempts) it was started `limit` times and each run's node died: result 9;
    (DROP, why) no such task (an older task of the speechID, or a row forgotten)."""
    conn.begin()
    try:
        with conn.cursor() as cur:
            cur.execute(ROW_SQL, (sid,))
            row = cur.fetchone()
            if row is None or row[0] != token:
                conn.commit()
                return DROP, 'no task of this speechID with this token'
            _, state, run_node, run_token, attempts, answer = row
            if state == FINAL:
                conn.commit()
                return ANSWERED, answer
            if state == RUNNING and run_token == my_token:
                conn.commit()
                return HOLD, run_node
            if state == RUNNING:
                cur.execute(NODE_SQL, (micros(dead_secs), run_node))
                node = cur.fetchone()
                if node is not None and node[0] == run_token and node[1] == 'running' and node[2]:
                    conn.commit()
                    return HOLD, run_node
            # Taken by this node either way (a DEAD task is ended here, with its record).
            cur.execute(RUN_SQL, (me, my_token, sid, token))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    if attempts >= limit:
        return DEAD, attempts
    return RUN, (attempts + 1, run_node if state == RUNNING else None)


def unrun(conn, sid, token, my_token):
    """A task this node took but could not start: back to queued for another node."""
    with conn.cursor() as cur:
        cur.execute(UNRUN_SQL, (sid, token, my_token))


def finish(conn, sid, token, answer, task_row=None):
    """The row final with its answer; `task_row`: the task table's final row as well ((sql, params)
    of _db), so that it does not depend on a db writer that may die with its node."""
    with conn.cursor() as cur:
        cur.execute(FINAL_SQL, (json.dumps(answer, ensure_ascii=False), sid, token))
        _task_row(cur, sid, task_row)


def _task_row(cur, sid, task_row):
    if task_row is not None:
        try:
            cur.execute(*task_row)
        except _db.POISON + _db.MALFORMED as exc:
            log.error('cluster: speechID=%s: final task row refused: %s', sid, exc)


def name_holder(conn, node):
    """(token, status, alive_at, age in seconds) of the life that wrote `node`'s heartbeat last, or None."""
    with conn.cursor() as cur:
        cur.execute(NAME_SQL, (node,))
        row = cur.fetchone()
    return None if row is None else (row[0], row[1], row[2], float(row[3]))


def heartbeat(conn, node, token, pid, status, broker_up, capacity, running, waiting):
    with conn.cursor() as cur:
        cur.execute(HEARTBEAT_SQL, (node, token, pid, status, int(bool(broker_up)), capacity, running, waiting))


def view(conn, dead_secs):
    """Every node with its heartbeat's age and alive flag, and the tasks in progress by state."""
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(NODES_SQL, (micros(dead_secs),))
        nodes = []
        for row in cur.fetchall():
            alive = bool(row.pop('fresh')) and row['status'] == 'running'
            row['age'] = round(float(row['age']), 3)
            row['alive'] = alive
            row['broker_up'] = bool(row['broker_up'])
            if row['engine_up'] is not None:
                row['engine_up'] = bool(row['engine_up'])
            nodes.append(row)
    with conn.cursor() as cur:
        cur.execute(COUNTS_SQL)
        tasks = {state: int(n) for state, n in cur.fetchall()}
    return {'nodes': nodes, 'alive': sum(n['alive'] for n in nodes), 'dead': sum(not n['alive'] for n in nodes),
            'tasks': {QUEUED: tasks.get(QUEUED, 0), RUNNING: tasks.get(RUNNING, 0)}}


def queue_depth(cfg):
    """Ready messages in the task queue and the dead-letter queue, or the broker's error."""
    import pika     # only this command and the cluster thread load it
    import pika.exceptions
    params = pika.URLParameters(cfg['cluster']['broker_url'])
    params.socket_timeout, params.connection_attempts = 3, 1
    base = cfg['cluster']['queue']
    try:
        conn = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        return {'error': '%s %s' % (type(exc).__name__, exc)}
    try:
        out = {}
        for key, name in (('tasks', base), ('dead', base + '.dead')):
            try:
                ok = conn.channel().queue_declare(name, passive=True)
                out[key] = ok.method.message_count
            except pika.exceptions.ChannelClosedByBroker:
                out[key] = None         # not declared yet: no node has started
        return out
    finally:
        conn.close()


def cmd_status(cfg, as_json=False, out=print):
    """`svcmgr.py cluster status`: every node from the database, the queue's depth from the broker."""
    c = cfg['cluster']
    try:
        conn = connect(cfg)
    except (pymysql.err.MySQLError, OSError) as exc:
        print('svcmgr cluster status: cannot reach the database: %s' % exc, file=sys.stderr)
        return 1
    try:
        ensure_tables(conn)
        state = view(conn, float(c['node_dead_secs']))
    finally:
        conn.close()
    state['queue'] = queue_depth(cfg)
    state['enabled'] = bool(c['enabled'])
    if as_json:
        out(json.dumps(state, default=str, ensure_ascii=False, indent=1))
        return 0
    q = state['queue']
    out('cluster: %s; queue %s: %s; %d node(s) alive, %d dead; tasks queued %d, running %d' % (
        'enabled' if c['enabled'] else 'disabled in this app.ini', c['queue'],
        'broker unreachable (%s)' % q['error'] if 'error' in q else '%s ready, %s dead-lettered' % (
            q['tasks'], q['dead']), state['alive'], state['dead'], state['tasks'][QUEUED], state['tasks'][RUNNING]))
    for n in state['nodes']:
        out('  %-24s %-5s heartbeat %6.1f s ago  broker %-4s engine %-12s workers %-3s capacity %-3s running %-3s '
            'waiting %s' % (n['node'], 'alive' if n['alive'] else 'DEAD', n['age'], 'up' if n['broker_up'] else 'down',
                            '%s/%s' % (n['engine_type'], 'up' if n['engine_up'] else 'down'), n['workers'],
                            n['capacity'], n['running'], n['waiting']))
    return 0
