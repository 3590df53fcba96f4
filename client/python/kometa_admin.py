"""Kometa admin client: Python 3.8+, standard library only.

Talks the binary admin protocol (docs/admin-protocol.md) over a Unix socket
or TCP. Install: copy this file next to your code.

    from kometa_admin import KometaAdmin, KometaError

    admin = KometaAdmin("unix:/run/kometa/admin.sock")
    admin.publish("news", "update", {"title": "hi"})   # {"offset": 1, ...}
    with admin.pipeline() as p:
        for n in range(100):
            p.publish("news", "n", n)
        results = p.execute()          # replies in order; errors as KometaError

Server errors raise KometaError(code, name, message). Transport failures
raise OSError (ConnectionError, TimeoutError / socket.timeout); a reply
that breaks the protocol raises KometaProtocolError. After a transport or
protocol failure the connection is dropped and the next call reconnects
(a failed request is never re-sent: PUBLISH is not idempotent).
"""

import json
import os
import selectors
import socket
import ssl
import struct
import tempfile
import time

__all__ = ["KometaAdmin", "KometaError", "KometaProtocolError", "Pipeline", "RpcError", "ERROR_NAMES"]

PROTOCOL_VERSION = 1

OP_AUTH = 0x01
OP_PUBLISH = 0x02
OP_STATS = 0x03
OP_SEND_USER = 0x04
OP_PRESENCE = 0x05
OP_PRESENCE_STATS = 0x06
OP_USER_STATUS = 0x07
OP_CHANNEL_INFO = 0x08
OP_CHANNELS = 0x09
OP_HISTORY = 0x0A
OP_DISCONNECT = 0x0B
OP_PING = 0x0C
OP_PUBLISH_MANY = 0x0D
OP_RELOAD = 0x0E
OP_HANDLE = 0x0F
OP_ANSWER = 0x10

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_CALL = 2  # not a reply: a client's rpc call to a handler connection

ERROR_NAMES = {
    1: "bad_frame",
    2: "unknown_opcode",
    3: "bad_argument",
    4: "unauthorized",
    5: "overloaded",
    6: "too_large",
    7: "not_found",
    8: "inbox_full",
    9: "shutting_down",
    10: "internal",
    11: "limit_reached",
    12: "unavailable",
    13: "unknown_outcome",
}

# Bytes after the length field before the payload: status/opcode, opcode/flags, request id.
_HEAD = struct.Struct(">IBBI")
_HEAD_BYTES = 6
# Replies larger than this are refused (a STATS document of hundreds of shards is far below it).
REPLY_BYTES_MAX = 64 << 20
_CHUNK = 64 * 1024


class KometaError(Exception):
    """An error reply from the server: `code` (int), `name` (str), `message` (str)."""

    def __init__(self, code, name, message):
        super().__init__(code, name, message)
        self.code = code
        self.name = name
        self.message = message

    def __str__(self):
        return "%s (%d): %s" % (self.name, self.code, self.message)

    def __repr__(self):
        return "KometaError(%r, %r, %r)" % (self.code, self.name, self.message)


class RpcError(Exception):
    """Raised by an rpc handler (KometaAdmin.serve_rpc): the client gets
    `backend_error` with this `code` (int) and `message`."""

    def __init__(self, code, message):
        super().__init__(code, message)
        self.code = code
        self.message = message


class KometaProtocolError(Exception):
    """The server's bytes did not follow the admin protocol (or a reply was too large)."""


_MISSING = object()


def _u16(value, what):
    value = int(value)
    if not 0 <= value <= 0xFFFF:
        raise ValueError("%s must be 0..65535, got %d" % (what, value))
    return struct.pack(">H", value)


def _u32(value, what):
    value = int(value)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("%s must be 0..4294967295, got %d" % (what, value))
    return struct.pack(">I", value)


def _u64(value, what):
    value = int(value)
    if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError("%s must be 0..2**64-1, got %d" % (what, value))
    return struct.pack(">Q", value)


def _str16(text, what):
    if isinstance(text, str):
        data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise TypeError("%s must be a str, got %s" % (what, type(text).__name__))
    if len(data) > 0xFFFF:
        raise ValueError("%s is %d bytes; at most 65535" % (what, len(data)))
    return struct.pack(">H", len(data)) + data


def _bytes32(data, what):
    if len(data) > 0xFFFFFFFF:
        raise ValueError("%s is too large" % what)
    return struct.pack(">I", len(data)) + data


def _users(users, what="users"):
    if isinstance(users, (str, bytes)):
        users = [users]
    users = list(users)
    if len(users) > 0xFFFF:
        raise ValueError("at most 65535 %s in one request" % what)
    return _u16(len(users), "user count") + b"".join(_str16(u, "user id") for u in users)


def _json_data(data, raw_json):
    if raw_json is not None:
        if data is not _MISSING:
            raise TypeError("pass either data or raw_json, not both")
        if isinstance(raw_json, str):
            raw_json = raw_json.encode("utf-8")
        return _bytes32(bytes(raw_json), "data")
    if data is _MISSING:
        data = None
    encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return _bytes32(encoded.encode("utf-8"), "data")


class _Reader:
    """Reads payload fields in order; every read checks bounds."""

    def __init__(self, payload):
        self.payload = payload
        self.at = 0

    def take(self, count, what):
        if self.at + count > len(self.payload):
            raise KometaProtocolError("reply payload ends inside %s" % what)
        chunk = self.payload[self.at:self.at + count]
        self.at += count
        return chunk

    def u16(self, what):
        return struct.unpack(">H", self.take(2, what))[0]

    def u32(self, what):
        return struct.unpack(">I", self.take(4, what))[0]

    def u64(self, what):
        return struct.unpack(">Q", self.take(8, what))[0]

    def str16(self, what):
        raw = self.take(self.u16(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KometaProtocolError("%s is not UTF-8" % what) from None

    def bytes32(self, what):
        return self.take(self.u32(what), what)

    def finish(self):
        if self.at != len(self.payload):
            raise KometaProtocolError("%d unexpected trailing reply bytes" % (len(self.payload) - self.at))


def _decode_empty(payload):
    _Reader(payload).finish()
    return True


def _decode_published(payload):
    reader = _Reader(payload)
    offset = reader.u64("offset")
    subscribers = reader.u64("subscribers")
    epoch = reader.str16("epoch")
    reader.finish()
    return {"offset": offset, "subscribers": subscribers, "epoch": epoch}


def _decode_document(payload):
    reader = _Reader(payload)
    document = reader.bytes32("document")
    reader.finish()
    try:
        return json.loads(document.decode("utf-8"))
    except ValueError as error:
        raise KometaProtocolError("reply document is not JSON: %s" % error) from None


def _decode_error(payload):
    reader = _Reader(payload)
    code = reader.u16("error code")
    message = reader.str16("error message")
    reader.finish()
    return KometaError(code, ERROR_NAMES.get(code, "error_%d" % code), message)


class _Operations:
    """Every operation, as a request; subclasses decide when it is sent."""

    def _submit(self, opcode, payload, decode):
        raise NotImplementedError

    def publish(self, channel, event, data=_MISSING, raw_json=None):
        """Publishes `data` (any JSON-serialisable value; or `raw_json=` bytes
        already encoded) to `channel` as `event`.
        Returns {"offset": int, "subscribers": int, "epoch": str}."""
        payload = _str16(channel, "channel") + _str16(event, "event") + _json_data(data, raw_json)
        return self._submit(OP_PUBLISH, payload, _decode_published)

    def publish_many(self, channels, event, data=_MISSING, raw_json=None):
        """Publishes the same data to each of `channels` (one offset in each).
        Returns {"results": [{"channel", "offset", "subscribers", "epoch"} or
        {"channel", "error": {"code", "message"}}, ...]} in request order."""
        payload = _users(channels, "channels") + _str16(event, "event") + _json_data(data, raw_json)
        return self._submit(OP_PUBLISH_MANY, payload, _decode_document)

    def stats(self, node_only=False):
        """Server totals and per-shard counters (dict). In cluster mode the
        cluster's, with every node's under "nodes"; node_only=True: this
        node's own figures only (a per-node health probe)."""
        return self._submit(OP_STATS, b"\x01" if node_only else b"", _decode_document)

    def reload(self):
        """Makes the server re-read its configuration (as SIGHUP does).
        Returns {"reloaded": True, "restart_needed": [keys]}; a file that
        fails validation raises KometaError bad_argument naming the key."""
        return self._submit(OP_RELOAD, b"", _decode_document)

    def send_user(self, users, event, data=_MISSING, raw_json=None):
        """Sends to every connection of each user (a str or a list of str)
        and stores it in their inboxes. Returns {"results": [...]}."""
        payload = _users(users) + _str16(event, "event") + _json_data(data, raw_json)
        return self._submit(OP_SEND_USER, payload, _decode_document)

    def presence(self, channel, cursor="", limit=0):
        """One page of a channel's members; pass the previous page's "next" as `cursor`."""
        payload = _str16(channel, "channel") + _str16(cursor or "", "cursor") + _u32(limit, "limit")
        return self._submit(OP_PRESENCE, payload, _decode_document)

    def presence_stats(self, channel):
        return self._submit(OP_PRESENCE_STATS, _str16(channel, "channel"), _decode_document)

    def user_status(self, users):
        """Status of each user (a str or a list of str). Returns {"results": [...]}."""
        return self._submit(OP_USER_STATUS, _users(users), _decode_document)

    def channel_info(self, channel):
        return self._submit(OP_CHANNEL_INFO, _str16(channel, "channel"), _decode_document)

    def channels(self, prefix="", cursor="", limit=0):
        """One page of existing channels whose names start with `prefix`."""
        payload = _str16(prefix, "prefix") + _str16(cursor or "", "cursor") + _u32(limit, "limit")
        return self._submit(OP_CHANNELS, payload, _decode_document)

    def history(self, channel, since=0, limit=0):
        """Retained publications after offset `since` (0: all), oldest first."""
        payload = _str16(channel, "channel") + _u64(since or 0, "since") + _u32(limit, "limit")
        return self._submit(OP_HISTORY, payload, _decode_document)

    def disconnect(self, user, code=0, reason="", revoke_before=0):
        """Closes every connection of `user` (code 0: 4003); with
        `revoke_before` > 0 (Unix seconds), older tokens are refused."""
        payload = _str16(user, "user") + _u16(code, "code") + _str16(reason, "reason") + _u64(
            revoke_before, "revoke_before")
        return self._submit(OP_DISCONNECT, payload, _decode_document)

    def ping(self):
        """Returns True when the server answers."""
        return self._submit(OP_PING, b"", _decode_empty)


# A non-blocking socket (or its TLS layer) that is not ready: retry later.
_NOT_READY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _recv_ready(sock):
    """What a readable non-blocking socket has. Over TLS, records already
    decrypted are not visible to select(), so they are taken now too."""
    chunk = sock.recv(_CHUNK)
    while chunk and isinstance(sock, ssl.SSLSocket) and sock.pending():
        chunk += sock.recv(sock.pending())
    return chunk


def _connect_error(error, address):
    """The same OSError subclass, with the address in the message."""
    message = "cannot connect to %s: %s" % (address, error.strerror or error)
    try:
        return type(error)(error.errno, message) if error.errno is not None else type(error)(message)
    except TypeError:
        return ConnectionError(message)


def _default_address():
    directory = os.environ.get("XDG_RUNTIME_DIR")
    if not directory or not os.path.isdir(directory):
        directory = tempfile.gettempdir()
    return "unix:" + os.path.join(directory, "kometa-admin.sock")


class KometaAdmin(_Operations):
    """A connection to the admin socket.

    `address` is "unix:/path/admin.sock", "tcp:host:port" or "tls:host:port"
    (default: the KOMETA_ADMIN environment variable, else the server's default
    socket). `key` is required on a TCP or TLS listener. A tls: server's
    certificate is checked for `host` against `ca_file` (PEM; default: the
    KOMETA_ADMIN_CA environment variable, else the system's CAs). `timeout`
    (seconds) bounds connecting and every wait for the socket. Not
    thread-safe: use one per thread.
    """

    def __init__(self, address=None, key=None, timeout=10, max_reply_bytes=REPLY_BYTES_MAX, ca_file=None):
        self.address = address or os.environ.get("KOMETA_ADMIN") or _default_address()
        self.ca_file = ca_file or os.environ.get("KOMETA_ADMIN_CA") or None
        self.key = key
        self.timeout = timeout
        self.max_reply_bytes = max_reply_bytes
        self._sock = None
        self._input = bytearray()
        self._next_id = 1
        self._connect()

    # -- connection -----------------------------------------------------

    def _connect(self):
        address = self.address
        if address.startswith("unix:"):
            path = address[len("unix:"):]
            if not path:
                raise ValueError("unix: needs a path, for example unix:/run/kometa/admin.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(path)
            except OSError as error:
                sock.close()
                raise _connect_error(error, address) from None
        elif address.startswith("tcp:") or address.startswith("tls:"):
            scheme = address[:3]
            host, sep, port = address[len("tcp:"):].rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("`%s`: expected %s:HOST:PORT" % (address, scheme))
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            try:
                sock = socket.create_connection((host, int(port)), timeout=self.timeout)
            except OSError as error:
                raise _connect_error(error, address) from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "tls":
                try:
                    context = ssl.create_default_context(cafile=self.ca_file)
                    sock = context.wrap_socket(sock, server_hostname=host)
                except (OSError, ssl.SSLError) as error:
                    sock.close()
                    raise _connect_error(error, address) from None
        else:
            raise ValueError("`%s` must start with unix:, tcp: or tls:" % address)
        self._sock = sock
        self._input = bytearray()
        if self.key is not None:
            result = self._round_trip([(OP_AUTH, _str16(self.key, "key"), _decode_empty)])[0]
            if isinstance(result, KometaError):
                self.close()
                raise result

    def close(self):
        """Closes the connection (the next call reconnects)."""
        sock, self._sock = self._sock, None
        self._input = bytearray()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- answering clients' rpc calls ----------------------------------

    def serve_rpc(self, prefixes, handler, max_calls=None, ready=None):
        """Makes this connection the handler of clients' `rpc` calls whose
        method starts with one of `prefixes` ("" for all; the server needs
        rpc.admin_handlers = true), then answers calls until the server
        closes the connection, or until `max_calls` answers: then the
        connection is closed (calls the server had already routed to it
        fail with `unavailable`; the next request on this object reconnects).

        `handler(call)` gets the call as a dict (kind, client, user,
        transport, method, data) and returns the result (any JSON value) or
        raises RpcError(code, message); any other exception, or a result
        that is not JSON, answers code 500 with its text. `ready()`, if
        given, is called once registered. Calls are answered one at a time,
        in arrival order; run several connections (processes, threads) to
        answer in parallel: the server spreads calls over handlers of the
        same prefix. Dedicate the connection to this: it serves no other
        request meanwhile. Returns the number of calls answered.
        """
        payload = _u16(len(prefixes), "prefixes") + b"".join(_str16(p, "prefix") for p in prefixes)
        self._submit(OP_HANDLE, payload, _decode_empty)
        if ready is not None:
            ready()
        answered = 0
        try:
            while max_calls is None or answered < max_calls:
                # Calls come when clients make them: no timeout while waiting.
                status, opcode, frame_id, payload = self._read_frame(timeout=None)
                if status == STATUS_CALL:
                    call = _decode_document(payload)
                    try:
                        try:
                            answer = {"result": handler(call)}
                        except RpcError as error:
                            answer = {"error": {"code": int(error.code), "message": str(error.message)}}
                        body = json.dumps(answer, allow_nan=False).encode("utf-8")
                    except Exception as error:  # the handler's bug is the client's backend_error
                        message = "%s: %s" % (type(error).__name__, error)
                        body = json.dumps({"error": {"code": 500, "message": message}}).encode("utf-8")
                    frame = _u32(frame_id, "call") + _bytes32(body, "answer")
                    request_id = self._next_id
                    self._next_id = (self._next_id % 0xFFFFFFFF) + 1
                    self._send_reading(_HEAD.pack(_HEAD_BYTES + len(frame), OP_ANSWER, 0, request_id) + frame)
                    answered += 1
                elif status == STATUS_ERROR and opcode == OP_ANSWER:
                    error = _decode_error(payload)
                    if error.name != "not_found":  # not_found: the call timed out first
                        raise error
                elif status != STATUS_OK:
                    raise KometaProtocolError("unexpected frame (status %d, opcode %d)" % (status, opcode))
        finally:
            # Still registered, with calls possibly on their way: not
            # usable for other requests. The server fails what it routed here.
            self.close()
        return answered

    def _send_reading(self, data):
        """Sends `data` while reading what the server sends meanwhile (into
        the input buffer), so neither side blocks on full socket buffers."""
        output = memoryview(data)
        sock = self._sock
        sock.setblocking(False)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                while output:
                    events = selector.select(self.timeout)
                    if not events:
                        raise socket.timeout("admin socket: no progress for %s s" % self.timeout)
                    for _, mask in events:
                        if mask & selectors.EVENT_WRITE:
                            try:
                                output = output[sock.send(output):]
                            except _NOT_READY:
                                pass
                        if mask & selectors.EVENT_READ:
                            try:
                                chunk = _recv_ready(sock)
                            except _NOT_READY:
                                continue
                            if not chunk:
                                raise ConnectionError("server closed the admin connection")
                            self._input += chunk
        finally:
            sock.setblocking(True)

    def _read_frame(self, timeout=None):
        """The next frame (status, opcode, id, payload), blocking (at most
        `timeout` seconds without progress; None: no limit)."""
        self._sock.settimeout(timeout)
        while True:
            if len(self._input) >= 4:
                length = struct.unpack_from(">I", self._input, 0)[0]
                if length < _HEAD_BYTES or length > self.max_reply_bytes:
                    raise KometaProtocolError("frame length %d out of range" % length)
                if len(self._input) >= 4 + length:
                    status, opcode, frame_id = struct.unpack_from(">BBI", self._input, 4)
                    payload = bytes(self._input[4 + _HEAD_BYTES:4 + length])
                    del self._input[:4 + length]
                    return status, opcode, frame_id, payload
            chunk = self._sock.recv(_CHUNK)
            if not chunk:
                raise ConnectionError("server closed the admin connection")
            self._input += chunk

    # -- requests -------------------------------------------------------

    def _submit(self, opcode, payload, decode):
        result = self._execute([(opcode, payload, decode)])[0]
        if isinstance(result, KometaError):
            raise result
        return result

    def pipeline(self):
        """A batch of requests sent at once: queue them on the returned
        object (same methods as this one), then call execute()."""
        return Pipeline(self)

    def _execute(self, requests):
        if self._sock is None:
            self._connect()
        results = self._round_trip(requests)
        for result in results:
            if isinstance(result, KometaError) and result.code == 1:
                # bad_frame: the server closes the connection after it.
                self.close()
                break
        return results

    def _round_trip(self, requests):
        """Sends every request and reads one reply per request, writing and
        reading at the same time so a long pipeline cannot deadlock on full
        socket buffers. Returns decoded results, KometaError for error replies."""
        frames = []
        ids = []
        for opcode, payload, _ in requests:
            request_id = self._next_id
            self._next_id = (self._next_id % 0xFFFFFFFF) + 1  # skip 0: the server's "no request"
            ids.append(request_id)
            frames.append(_HEAD.pack(_HEAD_BYTES + len(payload), opcode, 0, request_id))
            frames.append(payload)
        output = memoryview(b"".join(frames))
        results = []
        write_error = None
        sock = self._sock
        try:
            sock.setblocking(False)
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if output else 0))
                deadline = None if self.timeout is None else time.monotonic() + self.timeout
                while len(results) < len(requests):
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        raise socket.timeout("admin socket: no progress for %s s" % self.timeout)
                    events = selector.select(wait)
                    progress = False
                    for _, mask in events:
                        if mask & selectors.EVENT_WRITE and output:
                            try:
                                sent = sock.send(output)
                            except _NOT_READY:
                                sent = 0
                            except OSError as error:
                                # The server may have closed after an error reply
                                # (bad_frame): read what it sent before giving up.
                                write_error, sent = error, len(output)
                            output = output[sent:]
                            progress = progress or sent > 0
                            if not output:
                                selector.modify(sock, selectors.EVENT_READ)
                        if mask & selectors.EVENT_READ:
                            try:
                                chunk = _recv_ready(sock)
                            except _NOT_READY:
                                continue
                            except OSError:
                                if write_error is not None:
                                    raise write_error from None
                                raise
                            if not chunk:
                                if write_error is not None:
                                    raise write_error
                                raise ConnectionError(
                                    "server closed the admin connection (%d of %d replies read)"
                                    % (len(results), len(requests)))
                            self._input += chunk
                            progress = True
                            self._split_replies(requests, ids, results)
                    if progress and self.timeout is not None:
                        deadline = time.monotonic() + self.timeout
        except BaseException:
            # Half-sent requests or unread replies: the stream is out of step.
            self.close()
            raise
        if self._sock is not None:
            sock.settimeout(self.timeout)
        return results

    def _split_replies(self, requests, ids, results):
        buffer = self._input
        at = 0
        while len(results) < len(requests) and len(buffer) - at >= 4:
            length = struct.unpack_from(">I", buffer, at)[0]
            if length < _HEAD_BYTES:
                raise KometaProtocolError("reply length %d is shorter than the 6-byte head" % length)
            if length > self.max_reply_bytes:
                raise KometaProtocolError("reply of %d bytes is over the client's limit of %d"
                                          % (length, self.max_reply_bytes))
            if len(buffer) - at < 4 + length:
                break
            status, opcode, request_id = struct.unpack_from(">BBI", buffer, at + 4)
            payload = bytes(buffer[at + 4 + _HEAD_BYTES:at + 4 + length])
            at += 4 + length
            index = len(results)
            if status == STATUS_ERROR and request_id == 0 and request_id != ids[index]:
                # bad_frame (request id 0): the server closes the connection after it.
                error = _decode_error(payload)
                results.append(error)
                while len(results) < len(requests):
                    results.append(KometaError(error.code, error.name,
                                               "not processed: an earlier request broke the framing"))
                break
            if request_id != ids[index]:
                raise KometaProtocolError("reply for request %d while waiting for %d" % (request_id, ids[index]))
            if opcode != requests[index][0]:
                raise KometaProtocolError("reply opcode %d for a request with opcode %d"
                                          % (opcode, requests[index][0]))
            if status == STATUS_OK:
                results.append(requests[index][2](payload))
            elif status == STATUS_ERROR:
                results.append(_decode_error(payload))
            else:
                raise KometaProtocolError("unknown reply status %d" % status)
        del buffer[:at]


class Pipeline(_Operations):
    """Queues requests; execute() sends them all at once and returns the
    results in order (a KometaError instance in place of each failed one).
    Queue methods return the pipeline, so calls can be chained."""

    def __init__(self, admin):
        self._admin = admin
        self._queue = []

    def _submit(self, opcode, payload, decode):
        self._queue.append((opcode, payload, decode))
        return self

    def __len__(self):
        return len(self._queue)

    def execute(self):
        queue, self._queue = self._queue, []
        if not queue:
            return []
        return self._admin._execute(queue)

    def discard(self):
        self._queue = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Requests not executed are dropped, never sent.
        self.discard()
        return False
