"""A scripted stand-in for the 1.0 batch STT engine (sgsas_lstm): the far side of a
protocol we do not own. It writes frames exactly as 1.0's Python 2 code did
('{}{:8}'.format(type, len) over UTF-8 bytes, space padded) and reads them by
length with its own plain reader, independent of svcmgr's codec."""
import json
import socket
import threading
import time


def frame(ptype, body):
    data = body if isinstance(body, bytes) else body.encode('utf-8')
    return ('{}{:8}'.format(ptype, len(data))).encode('ascii') + data


class LegacyEngine:
    """Connects to svcmgr, logs in, and answers each 3001 according to `mode`:

    'answer' at once; 'silent' never; 'close' drops the connection after `close_after`
    requests; 'split' sends each 4001 in 1..3-byte segments. `transcript(req)` makes
    the text (Korean by default); `result` is the result code it answers with.
    """

    def __init__(self, port, name='sttengine', mode='answer', close_after=None, result='0',
                 transcript=None, delay=0.0, key='transcript', extra=None):
        self.port = port
        self.name = name
        self.mode = mode
        self.close_after = close_after
        self.result = result
        self.transcript = transcript or (lambda req: '안녕하세요 고객님, %s 통화입니다' % req['speechID'])
        self.delay = delay
        self.key = key
        self.extra = extra or (lambda req: {})     # more 4001 fields, e.g. segments
        self.received = []
        self.answered = []
        self.login_code = None
        self.closed = threading.Event()
        self.sock = None
        self.thread = None
        self.lock = threading.Lock()

    def _recv_exact(self, n):
        buf = b''
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError('closed')
            buf += chunk
        return buf

    def read_frame(self):
        header = self._recv_exact(12)
        ptype, length = int(header[:4]), int(header[4:].decode('ascii').strip())
        return ptype, self._recv_exact(length)

    def login(self, timeout=10):
        self.sock = socket.create_connection(('127.0.0.1', self.port), timeout=timeout)
        self.sock.sendall(frame(1001, self.name))
        ptype, body = self.read_frame()
        assert ptype == 2001, ptype
        self.login_code = body.decode('ascii')
        return self.login_code

    def start(self):
        """Log in and serve 3001s in a thread; returns the login answer."""
        code = self.login()
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return code

    def send_4001(self, body):
        data = frame(4001, json.dumps(body, ensure_ascii=False))
        with self.lock:
            if self.mode == 'split':
                i = 0
                while i < len(data):
                    step = 1 + i % 3
                    self.sock.sendall(data[i:i + step])
                    i += step
                    time.sleep(0.001)
            else:
                self.sock.sendall(data)

    def _serve(self):
        try:
            while True:
                ptype, body = self.read_frame()
                if ptype != 3001:
                    continue
                req = json.loads(body.decode('utf-8'))
                self.received.append(req)
                if self.mode == 'close' and len(self.received) >= (self.close_after or 1):
                    self.sock.close()
                    return
                if self.mode == 'silent':
                    continue
                if self.delay:
                    time.sleep(self.delay)
                answer = {'result': self.result, 'speechID': req['speechID'], self.key: self.transcript(req)}
                answer.update(self.extra(req))
                self.answered.append(answer)
                self.send_4001(answer)
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self.closed.set()

    def close(self):
        try:
            # shutdown first: close() alone does not send FIN while _serve is blocked in recv.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
