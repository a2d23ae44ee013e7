"""Reading a request body in the web process: a multipart/form-data upload streamed part by
part from the ASGI receive channel through python-multipart's push parser, its `file` straight
into a `.part` file in upload_path (never held whole in memory, cut off with TooLarge as soon
as it passes max_upload_mb), the other fields kept as text.
"""
import asyncio
import os
import uuid

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

BODY_IDLE_SECS = 300        # a client that sends nothing for this long has gone
FIELD_MAX = 64 << 10        # a form field other than the file (model, language, ...)
FIELDS_MAX = 64
MULTIPART_SLACK = 1 << 20   # headers and fields around the file in a Content-Length
SAFE_EXT = {'wav', 'mp3', 'm4a', 'ogg', 'oga', 'opus', 'flac', 'wma', 'aac', 'amr', 'pcm', 'webm', 'mp4',
            'mpeg', 'mpga', '3gp', 'aiff', 'aif', 'caf', 'mkv'}


class BodyError(Exception):
    """The body cannot be used: HTTP `status` and a message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class TooLarge(BodyError):
    def __init__(self, limit):
        super().__init__(413, 'the upload is larger than max_upload_mb (%s bytes)' % limit)


async def body_chunks(receive, idle=BODY_IDLE_SECS):
    """The request body in chunks as the ASGI server hands them over (it has already undone
    chunked transfer coding); BodyError when the client goes away or stalls for `idle` s."""
    while True:
        try:
            msg = await asyncio.wait_for(receive(), idle)
        except asyncio.TimeoutError:
            raise BodyError(408, 'no part of the body arrived for %d s' % idle) from None
        if msg['type'] == 'http.disconnect':
            raise BodyError(400, 'the body ended early: the client went away')
        data = msg.get('body') or b''
        if data:
            yield data
        if not msg.get('more_body', False):
            return


def content_length(headers):
    try:
        n = int(headers.get('Content-Length') or 0)
    except ValueError:
        raise BodyError(400, 'Content-Length is not a number') from None
    if n < 0:
        raise BodyError(400, 'Content-Length is negative')
    return n


def safe_ext(filename):
    """The extension an upload keeps on disk, from a short list; PyAV sniffs the content anyway."""
    ext = filename.rpartition('.')[2].lower() if '.' in filename else ''
    return ext if ext in SAFE_EXT else 'bin'


class Upload:
    """One multipart body: `fields` (name -> text), `path` of the file part (`.part` until done)."""

    def __init__(self, folder, limit):
        self.folder = folder
        self.limit = limit
        self.fields = {}
        self.path = None
        self.filename = None
        self.size = 0
        self._fh = None
        self._headers = {}
        self._hname = b''
        self._hvalue = b''
        self._name = None
        self._value = bytearray()
        self._is_file = False

    async def read(self, receive, headers):
        """Stream the body from `receive` into the parser; BodyError (TooLarge) stops it."""
        ctype, params = parse_options_header(headers.get('Content-Type') or '')
        boundary = params.get(b'boundary')
        if ctype != b'multipart/form-data' or not boundary:
            raise BodyError(400, 'the body must be multipart/form-data with a boundary')
        if content_length(headers) > self.limit + MULTIPART_SLACK:
            raise TooLarge(self.limit)
        parser = MultipartParser(boundary, self._callbacks())
        try:
            async for chunk in body_chunks(receive):
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise BodyError(400, 'malformed multipart body: %s' % exc) from None
        finally:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
        return self

    def discard(self):
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _callbacks(self):
        return {'on_part_begin': self._begin, 'on_header_field': self._hfield, 'on_header_value': self._hval,
                'on_header_end': self._hend, 'on_headers_finished': self._headers_done,
                'on_part_data': self._data, 'on_part_end': self._end}

    def _begin(self):
        self._headers, self._hname, self._hvalue = {}, b'', b''
        self._name, self._value, self._is_file = None, bytearray(), False

    def _hfield(self, data, start, end):
        self._hname += data[start:end]

    def _hval(self, data, start, end):
        self._hvalue += data[start:end]

    def _hend(self):
        self._headers[self._hname.decode('latin-1').lower()] = self._hvalue
        self._hname, self._hvalue = b'', b''

    def _headers_done(self):
        _, params = parse_options_header(self._headers.get('content-disposition', b''))
        self._name = params.get(b'name', b'').decode('utf-8', 'replace')
        filename = params.get(b'filename')
        if self._name == 'file' or filename is not None:
            if self._name != 'file' or self._fh is not None:
                raise BodyError(400, 'only one file part, named "file", is accepted')
            self._is_file = True
            self.filename = (filename or b'audio').decode('utf-8', 'replace')
            os.makedirs(self.folder, exist_ok=True)
            self.path = os.path.join(self.folder, '%s.%s.part' % (uuid.uuid4().hex, safe_ext(self.filename)))
            # O_EXCL: a name that exists (it cannot, but) is never overwritten.
            self._fh = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), 'wb')
        elif len(self.fields) >= FIELDS_MAX:
            raise BodyError(400, 'too many form fields')

    def _data(self, data, start, end):
        if self._is_file:
            self.size += end - start
            if self.size > self.limit:
                raise TooLarge(self.limit)
            self._fh.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > FIELD_MAX:
                raise BodyError(400, 'form field %s is too long' % self._name)

    def _end(self):
        if self._is_file:
            self._fh.close()
            self._fh = None
        else:
            value = self._value.decode('utf-8', 'replace')
            if self._name in self.fields and self._name.endswith('[]'):
                self.fields[self._name] = self.fields[self._name] + ',' + value
            else:
                self.fields[self._name] = value

    def finish(self):
        """Take the `.part` off the finished file's name; returns (folder, file name)."""
        final = self.path[:-len('.part')]
        os.rename(self.path, final)
        self.path = final
        return os.path.dirname(final), os.path.basename(final)
