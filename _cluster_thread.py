"""Cluster mode's thread: the one owner of the pika BlockingConnection (quorum task queue with
publisher confirms, a reply queue per node, the dead-letter queue) and of a PyMySQL connection
(cluster_task, cluster_node). The master's loop only puts commands here and reads what this
thread posts back; nothing here ever runs in the loop. Reconnects to both with backoff.
"""
import collections
import glob
import json
import logging
import os
import queue
import threading
import time
from types import SimpleNamespace

import pika
import pika.exceptions
import pymysql

import _cluster_db as cdb
import _db
import _webhook
from _records import FINAL, TaskRecord, unstamp
from _tasks import answer_body

log = logging.getLogger('cluster')

BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)
DB_ERRORS = (pymysql.err.MySQLError, OSError)
PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type='application/json')
# The longest a command waits in the queue while the broker's connection has nothing to say.
IDLE_SECS = 0.2
RETRY_MIN_SECS, RETRY_MAX_SECS = 0.5, 5.0
REPLY_TTL_MS = 24 * 3600 * 1000


def recorded_answer(folder, msg, since):
    """(the 2002 answer, the record as a dict) rebuilt from the last record of msg's speechID started after `since` in
    the last two days' records files of `folder`, or None."""
    sid = msg['speechID']
    key = json.dumps(sid).encode('utf-8')
    found = None
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), '[0-9]' * 8 + '.json')))[-2:]:
        try:
            with open(path, 'rb') as f:
                for raw in f:
                    if key not in raw:
                        continue
                    try:
                        line = json.loads(raw)
                        if line['data']['speechID'] == sid and unstamp(line['startTime']) >= since:
                            found = line
                    except (ValueError, KeyError, TypeError):
                        continue        # a torn or foreign line
        except OSError as exc:
            log.warning('cluster: cannot read %s: %s', path, exc)
    if found is None:
        return None
    rec = TaskRecord.from_line(found)
    return answer_body(SimpleNamespace(speech_id=sid, request=msg['request']), rec, rec.state, rec.result), \
        rec.to_dict()


def webhook_of(cfg, record):
    """The webhook of a task a dead node recorded, into this node's outbox: its webhook-id is the
    one the dead node gave it (a function of the record), so a receiver that got it from there
    already, or gets it from that outbox adopted later, sees one id."""
    if not cfg['webhook']['url']:
        return
    try:
        rec = TaskRecord.from_dict(record)
        payload = _webhook.build_payload(rec)
        box = _webhook.Outbox(_webhook.outbox_dir(cfg))
        box.add(box.new_entry(rec.speech_id, payload, msg_id=_webhook.entry_id(payload)))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        log.error('cluster: speechID=%s: no webhook from its record: %s', record.get('speechID'), exc)


def adopt_outboxes(cfg, me, view):
    """Webhooks a dead node wrote into its outbox on the shared storage but never delivered go
    out from this node's (its senders find them at their next rescan)."""
    shared = cfg['cluster']['shared_path']
    if not shared or not cfg['webhook']['url']:
        return
    own = _webhook.outbox_dir(cfg)
    for node in view.get('nodes') or ():
        name = node.get('node') or ''
        if node.get('alive') or name == me or os.sep in name or name.startswith('.'):
            continue
        dead_box = os.path.join(shared, 'records', name, 'webhook')
        try:
            moved = _webhook.adopt_outbox(dead_box, own)
            # The ones it gave up on: into this node's failed/, where `webhook redeliver` finds them.
            gave_up = _webhook.adopt_outbox(os.path.join(dead_box, _webhook.FAILED), os.path.join(own, _webhook.FAILED))
        except OSError as exc:
            log.warning('cluster: cannot adopt the webhook outbox of %s: %s', name, exc)
            continue
        if moved:
            log.warning('cluster: %d undelivered webhook(s) of dead node %s adopted', moved, name)
        if gave_up:
            log.warning('cluster: %d webhook(s) dead node %s gave up on adopted into %s (svcmgr.py webhook '
                        'redeliver sends them again)', gave_up, name, os.path.join(own, _webhook.FAILED))


class Backoff:
    """Delays between reconnection attempts: doubling from RETRY_MIN_SECS up to RETRY_MAX_SECS."""

    def __init__(self):
        self.delay = 0.0

    def next(self):
        self.delay = min(RETRY_MAX_SECS, max(RETRY_MIN_SECS, 2 * self.delay))
        return self.delay


class Publisher:
    """Publisher confirms with many messages in flight. pika's BlockingChannel.basic_publish
    waits for each message's confirm in turn (a broker fsync each, about 4 ms here), which held
    a node to some 250 publishes a second and put that wait on every task. The blocking
    channel's own asynchronous channel (`_impl`, pika 1.4 as pinned) takes a publish without
    waiting; the broker's Basic.Ack/Nack arrive while the connection processes events and are
    only noted here (`settle()` runs their callbacks in the thread's own step, never inside
    pika's I/O). An unroutable message (its queue deleted) is returned before its ack: logged,
    then counted as done, as BlockingChannel's UnroutableError was."""

    SELECT_SECS = 10

    def __init__(self, conn, channel):
        self.conn, self.impl = conn, channel._impl
        self.seq = 0
        self.pending = {}                       # delivery tag -> (on_ok, on_fail)
        self.confirms = []                      # (tag, multiple, acked) not yet settled
        self.impl.add_on_return_callback(self.on_return)
        selected = []

        def on_select_ok(frame):
            selected.append(frame)
            conn.call_later(0, _nothing)        # ends the wait below at once
        self.impl.confirm_delivery(self.on_confirm, callback=on_select_ok)
        deadline = time.monotonic() + self.SELECT_SECS
        while not selected:
            if time.monotonic() >= deadline:
                raise pika.exceptions.AMQPConnectionError('no Confirm.SelectOk within %d s' % self.SELECT_SECS)
            conn.process_data_events(time_limit=0.5)

    def publish(self, queue_name, body, on_ok=None, on_fail=None):
        self.impl.basic_publish('', queue_name, body, PERSISTENT, mandatory=True)
        self.seq += 1
        self.pending[self.seq] = (on_ok, on_fail)

    def on_confirm(self, frame):
        method = frame.method
        self.confirms.append((method.delivery_tag, method.multiple, isinstance(method, pika.spec.Basic.Ack)))
        self.conn.call_later(0, _nothing)      # process_data_events returns to settle it

    def on_return(self, channel, method, props, body):
        log.error('cluster: %s has no queue %s; message dropped (%s)', method.exchange or 'the broker',
                  method.routing_key, body[:120])

    def settle(self):
        """Callbacks of the messages the broker confirmed (on_ok) or refused (on_fail) since the last call."""
        confirms, self.confirms = self.confirms, []
        for tag, multiple, acked in confirms:
            tags = [t for t in self.pending if t <= tag] if multiple else [tag]
            for t in tags:
                on_ok, on_fail = self.pending.pop(t, (None, None))
                callback = on_ok if acked else on_fail
                if not acked:
                    log.warning('cluster: the broker refused a message (nack); it is published again')
                if callback is not None:
                    callback()

    def fail_all(self):
        """The connection is gone: no confirm is coming for what is still pending."""
        pending, self.pending = self.pending, {}
        self.confirms = []
        for _, on_fail in pending.values():
            if on_fail is not None:
                on_fail()


def _nothing():
    pass


def reply_body(msg, answer, record=None):
    """The reply to the node holding the client; an HTTP task's carries the runner's record (a dict,
    or None), which the origin's web process answers with as with a local task's."""
    body = {'speechID': msg['speechID'], 'token': msg['token'], 'answer': answer}
    if record is not None and msg.get('source') == 'http':
        body['record'] = record
    return body


def queue_names(base, node):
    return {'tasks': base, 'dead': base + '.dead', 'reply': '%s.reply.%s' % (base, node)}


def declare(channel, names, delivery_limit, passive=False):
    """The quorum task queue (dead letters to <queue>.dead), the dead-letter queue, this node's
    reply queue; returns the task queue's depth (ready messages)."""
    ok = channel.queue_declare(names['tasks'], durable=True, passive=passive, arguments=None if passive else {
        'x-queue-type': 'quorum', 'x-delivery-limit': delivery_limit,
        'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': names['dead']})
    if not passive:
        channel.queue_declare(names['dead'], durable=True, arguments={'x-queue-type': 'quorum'})
        # A dead node's answers are of no use once its clients are gone: they expire.
        channel.queue_declare(names['reply'], durable=True, arguments={'x-message-ttl': REPLY_TTL_MS})
    return ok.method.message_count


class Connections:
    """The cluster thread's two connections, each made again with backoff when it is lost, and
    what goes over the broker's: the consumers' prefetch, publishes, acknowledgements."""

    def connect_db(self):
        try:
            self.db = cdb.connect(self.cfg)
            cdb.ensure_tables(self.db)
        except DB_ERRORS as exc:
            self.db = None
            self.db_next = time.monotonic() + self.db_backoff.next()
            log.warning('cluster: database unreachable (%s); trying again', exc)
            return
        self.db_backoff = Backoff()
        log.info('cluster: database connected')

    def drop_db(self, why):
        if self.db is not None:
            log.warning('cluster: database connection lost (%s)', why)
            try:
                self.db.close()
            except DB_ERRORS:
                pass
        self.db = None
        self.db_next = time.monotonic() + self.db_backoff.next()

    def db_do(self, fn, *args):
        """fn(the connection, *args), again when InnoDB undid it for a deadlock; raises DB_ERRORS."""
        return _db.again_on_deadlock(self.db, fn, *args)

    def with_db(self, fn, *args):
        if self.db is None:
            return False
        try:
            return self.db_do(fn, *args) or True
        except DB_ERRORS as exc:
            self.drop_db(exc)
            return False

    def connect_broker(self):
        params = pika.URLParameters(self.url)
        params.heartbeat, params.socket_timeout, params.blocked_connection_timeout = 5, 3, 10
        params.connection_attempts = 1
        conn = None
        try:
            conn = pika.BlockingConnection(params)
            channel = conn.channel()
            publisher = Publisher(conn, channel)
            self.depth = declare(channel, self.names, self.limit)
            channel.basic_consume(self.names['reply'], self.on_reply)
        except BROKER_ERRORS as exc:
            # Connected but refused later (a queue declared with other arguments: 406): the
            # connection goes too, or every retry would leave one open.
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except BROKER_ERRORS:
                    pass
            self.broker_next = time.monotonic() + self.broker_backoff.next()
            log.warning('cluster: broker unreachable (%s); trying again in %.1f s', exc or type(exc).__name__,
                        self.broker_next - time.monotonic())
            return
        self.conn, self.channel, self.publisher, self.gen = conn, channel, publisher, self.gen + 1
        self.consuming, self.consumers = 0, ()
        self.broker_backoff = Backoff()
        self.held.clear()           # their deliveries went back to the queue with the old connection
        self.running.clear()
        self.apply_capacity()
        log.info('cluster: broker connected (%d task(s) waiting to be published)',
                 sum(1 for c in self.later if c[0] == 'submit'))

    def drop_broker(self, why):
        if self.conn is not None:
            log.warning('cluster: broker connection lost (%s); tasks wait here until it is back', why or
                        type(why).__name__)
            try:
                self.conn.close()
            except BROKER_ERRORS:
                pass
        self.conn = self.channel = None
        if self.publisher is not None:
            publisher, self.publisher = self.publisher, None
            publisher.fail_all()
        self.broker_next = time.monotonic() + self.broker_backoff.next()

    def apply_capacity(self):
        """Prefetch = what this node can run; none at all (prefetch 0 would mean no limit): no consumer."""
        if self.channel is None or self.capacity == self.consuming:
            return
        try:
            # A prefetch applies to consumers made after it: new ones take the new capacity.
            for tag in self.consumers:
                self.channel.basic_cancel(tag)
            self.consumers = ()
            if self.capacity > 0:
                self.channel.basic_qos(prefetch_count=self.capacity)
                # Dead letters (a task the broker saw return too often) are decided like any task:
                # by its attempts in cluster_task, so the two counts cannot disagree.
                self.consumers = (self.channel.basic_consume(self.names['tasks'], self.on_task),
                                  self.channel.basic_consume(self.names['dead'],
                                                             lambda *a: self.on_task(*a, dead=True)))
        except BROKER_ERRORS as exc:
            self.drop_broker(exc)
            return
        self.consuming = self.capacity

    def publish(self, queue_name, msg, on_ok=None, on_fail=None):
        """Send msg; on_ok once the broker confirmed it, on_fail if it never will (by default it is
        published again). False (nothing sent) while the broker is down."""
        if self.publisher is None:
            return False
        if on_fail is None:
            on_fail = lambda: self.later.append(('publish', queue_name, msg, on_ok))  # noqa: E731

        def ok():
            self.published += 1
            if on_ok is not None:
                on_ok()
        try:
            self.publisher.publish(queue_name, json.dumps(msg, ensure_ascii=False).encode('utf-8'), ok, on_fail)
        except BROKER_ERRORS as exc:
            self.drop_broker(exc)
            return False
        return True

    def ack(self, handle, requeue=None):
        self.running.discard(handle)
        if self.channel is None or handle[0] != self.gen:
            return      # that delivery went back to the queue with its connection; its next taker sees the row
        try:
            # On the asynchronous channel, as Publisher's publishes: BlockingChannel.basic_ack waits
            # to write each ack out; these go with the next process_data_events of the thread's step.
            if requeue is None:
                self.channel._impl.basic_ack(handle[1])
            else:
                self.channel._impl.basic_nack(handle[1], requeue=requeue)
        except BROKER_ERRORS as exc:
            self.drop_broker(exc)


class NameGuard:
    """Whether this node's name is free for this life: no heartbeat row, a row this life wrote, a
    stopped one, or one whose heartbeat stopped coming (an earlier life killed) are free; a row
    whose heartbeat another life keeps writing is TAKEN. Decided once, at start."""
    OURS, WAIT, TAKEN = 'ours', 'wait', 'taken'
    # An earlier life that wrote no heartbeat in this many of our periods is gone.
    QUIET_BEATS = 3

    def __init__(self):
        self.state = self.WAIT
        self.seen = None                # (alive_at, when we first saw it)

    @property
    def ours(self):
        return self.state == self.OURS

    def judge(self, holder, token, dead_secs, beat_secs, now):
        """The state after reading the name's heartbeat row `holder` (cdb.name_holder) once more."""
        if holder is None or holder[0] == token or holder[1] != 'running' or holder[3] > dead_secs:
            self.state = self.OURS
        elif self.seen is None:
            self.seen = (holder[2], now)
        elif holder[2] != self.seen[0]:
            self.state = self.TAKEN
        elif now - self.seen[1] >= self.QUIET_BEATS * beat_secs:
            self.state = self.OURS
        return self.state


class ClusterThread(Connections, threading.Thread):
    """`put(command)` from any thread; `post(event)` (given) hands events to the master's loop:
    ('run', msg, handle, attempts), ('dead', msg, handle, attempts), ('answer', sid, token, body, record),
    ('refused', sid, token, result, message), ('published', sid, token), ('view', dict),
    ('name taken', node) (another live node has this node's name: the master stops)."""

    def __init__(self, cfg, node, token, post, waiting):
        super().__init__(name='cluster', daemon=True)
        c = cfg['cluster']
        self.cfg, self.node, self.token, self.post, self.waiting = cfg, node, token, post, waiting
        self.url = c['broker_url']
        self.names = queue_names(c['queue'], node)
        self.dead_secs, self.beat_secs = float(c['node_dead_secs']), float(c['heartbeat_secs'])
        self.limit = int(c['delivery_limit'])
        self.shared = c['shared_path']
        self.server_seq = int(cfg['server']['server_seq'])
        self.commands = queue.Queue()
        self.later = collections.deque()        # commands that wait for the broker or the database
        self.held = {}                          # handle -> message a live node runs: watched until final
        self.running = set()                    # handles of tasks this node runs now
        self.delivered = []                     # (handle, message) consumed, not yet decided
        self.conn = self.channel = self.publisher = self.db = None
        self.gen = 0                            # which broker connection a delivery handle belongs to
        self.capacity, self.consuming, self.consumers = 0, 0, ()
        self.broker_backoff, self.db_backoff = Backoff(), Backoff()
        self.broker_next = self.db_next = self.beat_next = 0.0
        self.depth = None
        self.stopping = False
        self.published = self.replied = 0
        self.name_guard = NameGuard()

    # ------------------------------------------------------------ any thread

    def put(self, command):
        self.commands.put(command)
        conn = self.conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)      # wakes process_data_events
            except BROKER_ERRORS:
                pass

    # ------------------------------------------------------------ the thread

    def run(self):
        log.info('cluster: node %s (life %s) on %s, queue %s', self.node, self.token[:8],
                 self.url.split('@')[-1], self.names['tasks'])
        while not (self.stopping and not self.later and not (self.publisher and self.publisher.pending)):
            try:
                self.step()
            except Exception:  # the thread's one catch-all: drop both connections, back off, go on
                log.error('cluster: unexpected error', exc_info=True)
                self.drop_broker('unexpected error')
                self.drop_db('unexpected error')
                time.sleep(0.5)
            if self.stopping and (self.conn is None or self.db is None):
                break
        self.finish()

    def step(self):
        now = time.monotonic()
        if self.db is None and now >= self.db_next:
            self.connect_db()
        if self.conn is None and now >= self.broker_next and self.db is not None and self.name_guard.ours:
            self.connect_broker()
        if time.monotonic() >= self.beat_next:
            self.beat_next = time.monotonic() + self.beat_secs
            self.periodic()
        wait = 0.0 if not self.commands.empty() else max(0.0, min(IDLE_SECS, self.beat_next - time.monotonic()))
        if self.conn is not None:
            try:
                # Back at once when a delivery or a confirm arrives or a command is put (put() wakes it).
                self.conn.process_data_events(time_limit=wait)
            except BROKER_ERRORS as exc:
                self.drop_broker(exc)
            if self.publisher is not None:
                self.publisher.settle()
        else:
            try:
                self.later.append(self.commands.get(timeout=wait))
            except queue.Empty:
                pass
        self.take_commands()
        self.decide_all()

    def take_commands(self):
        while True:
            try:
                self.later.append(self.commands.get_nowait())
            except queue.Empty:
                break
        self.prepare()
        for _ in range(len(self.later)):
            command = self.later.popleft()
            if not self.do(command):
                self.later.append(command)      # tried again once the broker or database is back

    def do(self, command):
        """Carry out one command; False when it must wait (broker or database down)."""
        kind = command[0]
        if kind == 'stop':
            self.stopping = True
            return True
        if kind == 'capacity':
            self.capacity = command[1]
            self.apply_capacity()
            return True
        if kind == 'submit':
            return self.submit(command[1])
        if kind == 'finish':
            return self.finish_task(*command[1:])
        if kind == 'unrun':
            return self.unrun(*command[1:])
        if kind == 'reply':
            return self.reply(*command[1:])
        if kind == 'publish':
            return self.publish(*command[1:])
        if kind == 'forget':
            return self.with_db(cdb.forget, *command[1:])
        log.error('cluster: unknown command %r', kind)
        return True

    # ------------------------------------------------------------ connections

    def prepare(self):
        """The database work of every waiting submit and finish and of the tasks just delivered, in
        one transaction (one commit for all); the commands then only publish and ack, and
        decide_all() runs what it took."""
        subs = [c[1] for c in self.later if c[0] == 'submit' and 'entered' not in c[1]]
        ends = [c for c in self.later if c[0] == 'finish' and not c[1].get('final')]
        takes = [] if self.stopping else [m for _, m in self.delivered]
        if self.db is None or not (subs or ends or takes):
            return

        def work(conn):
            entered = cdb.insert_many(conn, [(m['speechID'], m['token'], m['source'], self.message(m))
                                             for m in subs], self.node, self.dead_secs, self.token)
            cdb.finish_many(conn, [(c[1]['speechID'], c[1]['token'], c[3], self.task_row(*c[4:])) for c in ends])
            return entered, cdb.take_many(conn, [(m['speechID'], m['token']) for m in takes], self.node,
                                          self.token, self.limit)
        try:
            # One statement alone commits by itself (autocommit): no BEGIN and COMMIT round trips.
            alone = len(subs) + len(takes) == 1 and not ends
            entered, taken = self.db_do(work) if alone else self.db_do(cdb.atomic, work)
        except DB_ERRORS as exc:
            self.drop_db(exc)
            return
        for msg, (ok, answer) in zip(subs, entered):
            msg['entered'], msg['answer'] = ok, answer
        for command in ends:
            command[1]['final'] = True
        for msg, fast in zip(takes, taken):
            msg['fast'] = fast

    # ------------------------------------------------------------ origin: publish, answers

    def submit(self, msg):
        sid, token = msg['speechID'], msg['token']
        if 'entered' not in msg:
            return False        # prepare() enters it (this step, or once the database is back)
        if not msg['entered']:
            self.post(('refused', sid, token, json.loads(msg['answer']) if msg['answer'] else None))
            return True
        body = {k: v for k, v in msg.items() if k not in ('entered', 'answer', 'published')}

        def published():
            msg['published'] = True
            self.post(('published', sid, token))
        # No confirm (the connection died, or a nack): the command waits for the next try.
        return self.publish(self.names['tasks'], body, published, lambda: self.later.append(('submit', msg)))

    @staticmethod
    def message(msg):
        """The task's message as its row keeps it, for a live node to publish again if this life dies first."""
        return json.dumps(msg, ensure_ascii=False)

    def sweep(self):
        """Publish again what dead lives entered and may never have published (a duplicate finds the
        row taken or final: take() never runs a task twice)."""
        try:
            found = self.db_do(cdb.orphans, self.node, self.token, self.dead_secs)
        except DB_ERRORS as exc:
            self.drop_db(exc)
            return
        for sid, message in found:
            log.warning('cluster: speechID=%s was entered by a node that died before its end; publishing it again',
                        sid)
            try:
                self.publish(self.names['tasks'], json.loads(message))
            except ValueError as exc:
                log.error('cluster: speechID=%s: unreadable message (%s)', sid, exc)

    def on_reply(self, channel, method, props, body):
        try:
            self.on_reply_body(json.loads(body))
        except (ValueError, KeyError, TypeError) as exc:
            log.error('cluster: bad reply dropped (%s)', exc)
        channel._impl.basic_ack(method.delivery_tag)

    # ------------------------------------------------------------ runner: take, finish

    def on_task(self, channel, method, props, body, dead=False):
        handle = (self.gen, method.delivery_tag)
        try:
            msg = json.loads(body)
            msg['speechID'], msg['token']
        except (ValueError, KeyError, TypeError) as exc:
            log.error('cluster: bad task message dropped (%s)', exc)
            channel.basic_ack(method.delivery_tag)
            return
        msg['dead'] = dead
        self.delivered.append((handle, msg))

    def decide_all(self):
        """The tasks just delivered: those prepare() took run here, the rest are decided one by one."""
        batch, self.delivered = self.delivered, []
        for handle, msg in batch:
            if msg.pop('fast', False):
                self.running.add(handle)
                self.post(('run', msg, handle, None))
            else:
                self.decide(handle, msg)

    def decide(self, handle, msg):
        sid = msg['speechID']
        if self.stopping:
            return      # left unacked: it goes back to the queue when the connection closes
        if self.db is None:
            self.held[handle] = msg             # decided once the database is back
            return
        try:
            what, detail = self.db_do(cdb.take, sid, msg['token'], self.node, self.token, self.dead_secs,
                                      self.limit)
        except DB_ERRORS as exc:
            self.drop_db(exc)
            self.held[handle] = msg
            return
        self.held.pop(handle, None)
        if what == cdb.RUN:
            attempts, dead_node = detail
            found = self.recorded(dead_node, msg) if dead_node else None
            if found is not None:
                # Its node died after writing the record, before marking the row final: not run again.
                log.warning('cluster: speechID=%s was recorded by %s before it died; answering from its record',
                            sid, dead_node)
                webhook_of(self.cfg, found[1])
                if not self.finish_task(msg, handle, *found, dead_node):
                    self.later.append(('finish', msg, handle, *found, dead_node))
                return
            self.running.add(handle)
            self.post(('run', msg, handle, attempts))
        elif what == cdb.DEAD:
            self.running.add(handle)
            self.post(('dead', msg, handle, detail))
        elif what == cdb.ANSWERED:
            if not self.reply(msg, json.loads(detail) if detail else None, lambda: self.ack(handle)):
                self.held[handle] = msg         # decided again once the broker is back
        elif what == cdb.HOLD:
            if handle not in self.held:
                log.info('cluster: speechID=%s runs on %s, which is alive: waiting for its end', sid, detail)
            self.held[handle] = msg
        else:
            log.info('cluster: speechID=%s token %s dropped: %s', sid, msg['token'][:8], detail)
            self.ack(handle)

    def recorded(self, node, msg):
        """(answer, record) of the task from `node`'s records on the shared storage, or None."""
        if not self.shared:
            return None
        folder = os.path.join(self.shared, 'records', node)
        # The runner's clock wrote startTime: a minute of skew is allowed.
        return recorded_answer(folder, msg, float(msg.get('created') or 0) - 60)

    def reply(self, msg, answer, then=None, record=None):
        """The answer to the node holding the client; then() once it is safe (confirmed)."""
        if answer is None:
            if then is not None:
                then()
            return True
        body = reply_body(msg, answer, record)
        if msg['reply'] == self.names['reply']:
            # This node holds the client: the answer goes to the loop as its own reply queue would
            # bring it, without a broker round trip (its token still says which admission it answers).
            self.on_reply_body(body)
            if then is not None:
                then()
            return True
        return self.publish(msg['reply'], body, then, lambda: self.later.append(('reply', msg, answer, then, record)))

    def on_reply_body(self, msg):
        self.post(('answer', msg['speechID'], msg['token'], msg['answer'], msg.get('record')))

    def task_row(self, record=None, node=None):
        """The task table's final row of a record (as _db's writer makes it), or None."""
        if record is None:
            return None
        try:
            return _db.statement({'event': FINAL, 'node': node or self.node, 'serverSeq': self.server_seq,
                                  'payload': record})
        except _db.MALFORMED as exc:
            log.error('cluster: speechID=%s: no final task row from its record (%s)', record.get('speechID'), exc)
            return None

    def finish_task(self, msg, handle, answer, record=None, node=None):
        if not msg.get('final'):
            if not self.with_db(cdb.atomic, cdb.finish, msg['speechID'], msg['token'], answer,
                                self.task_row(record, node)):
                return False
            msg['final'] = True
        def replied():
            self.replied += 1
            self.ack(handle)
        return self.reply(msg, answer, replied, record)

    def unrun(self, msg, handle):
        if not self.with_db(cdb.unrun, msg['speechID'], msg['token'], self.token):
            return False
        self.ack(handle, requeue=True)
        return True

    # ------------------------------------------------------------ every heartbeat_secs

    def periodic(self):
        if self.db is not None and not self.name_guard.ours:
            if self.name_guard.state == NameGuard.WAIT:
                self.claim_name()
            return
        if self.db is not None and self.with_db(
                cdb.heartbeat, self.node, self.token, os.getpid(), 'stopped' if self.stopping else 'running',
                self.conn is not None, self.capacity, len(self.running), self.waiting()):
            for handle, msg in list(self.held.items()):
                self.decide(handle, msg)
            if self.channel is not None and not self.stopping:
                self.sweep()
            try:
                view = self.db_do(cdb.view, self.dead_secs)
            except DB_ERRORS as exc:
                self.drop_db(exc)
                view = None
            if view is not None:
                if self.channel is not None:
                    try:
                        self.depth = declare(self.channel, self.names, self.limit, passive=True)
                    except BROKER_ERRORS as exc:
                        self.drop_broker(exc)
                view['queueDepth'] = self.depth
                self.post(('view', view))
                adopt_outboxes(self.cfg, self.node, view)

    def claim_name(self):
        """Before this life writes its first heartbeat or takes a task: another life that wrote this
        node name's heartbeat and still does is another node with the same name (an app.ini copied
        without changing [db] node). Both would take each other's answers and look dead to each
        other, so the newcomer (this life) never writes and asks the master to stop."""
        try:
            holder = self.db_do(cdb.name_holder, self.node)
        except DB_ERRORS as exc:
            self.drop_db(exc)
            return
        verdict = self.name_guard.judge(holder, self.token, self.dead_secs, self.beat_secs, time.monotonic())
        if verdict == NameGuard.TAKEN:
            log.error('cluster: node name %s is in use by another live node (its heartbeat keeps coming, life %s,'
                      ' status %s): give every node its own [db] node; this node stops', self.node,
                      holder[0][:8], holder[1])
            self.post(('name taken', self.node))
        elif verdict == NameGuard.OURS:
            self.beat_next = 0.0        # the first heartbeat at once

    def finish(self):
        for command in self.later:
            if command[0] == 'submit' and command[1].get('entered') and not command[1].get('published'):
                # Never published: the row goes, so the speechID is free again.
                self.with_db(cdb.forget, command[1]['speechID'], command[1]['token'])
        if self.db is not None and self.name_guard.ours:
            self.with_db(cdb.heartbeat, self.node, self.token, os.getpid(), 'stopped', False, 0, 0, 0)
        for conn in (self.conn, self.db):
            try:
                if conn is not None:
                    conn.close()
            except BROKER_ERRORS + DB_ERRORS:
                pass
        log.info('cluster: stopped (%d published, %d answered, %d command(s) left)', self.published,
                 self.replied, len(self.later))

    def stop(self, timeout=10):
        self.put(('stop',))
        self.join(timeout)
