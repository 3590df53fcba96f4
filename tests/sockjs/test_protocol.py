#!/usr/bin/env python3
"""SockJS protocol conformance tests for Kometa, written from the SockJS
protocol description (protocol 0.3.x: URLs, frames, transports, CORS and
caching, JSESSIONID, encoding, session closing, HTTP/1.0 and 1.1).

They run against a real server started by `tests/sockjs.rs` (cargo test)
with `sockjs.test_services = true` and `sockjs.response_limit_bytes = 4096`:

    SOCKJS_URL=http://127.0.0.1:PORT            the services /echo, /close,
                                                /disabled_websocket_echo,
                                                /cookie_needed_echo
    SOCKJS_HEARTBEAT_URL=http://127.0.0.1:PORT  the same with a short
                                                sockjs.heartbeat_interval_ms

Needs Python 3 and `websockets` (scripts/install-test-deps.sh puts both in
.venv). Run by hand: `.venv/bin/python tests/sockjs/test_protocol.py -v`.
"""

import base64
import hashlib
import json
import os
import re
import socket
import time
import unittest
import uuid
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

TOP = os.environ.get("SOCKJS_URL", "http://127.0.0.1:8081")
HEARTBEAT_TOP = os.environ.get("SOCKJS_HEARTBEAT_URL", "")
ECHO = "/echo"
CLOSE = "/close"
NO_WS = "/disabled_websocket_echo"
COOKIE = "/cookie_needed_echo"
TIMEOUT_S = 10
NO_CACHE = "no-store, no-cache, no-transform, must-revalidate, max-age=0"
HEARTBEATS = ("h\n", "data: h\r\n\r\n", '<script>\np("h");\n</script>\r\n')


def address(top=TOP):
    parts = urlsplit(top)
    return parts.hostname, parts.port


def session_url(service=ECHO, server="000"):
    return "%s/%s/%s" % (service, server, uuid.uuid4())


class Response:
    def __init__(self, status, version, headers, body):
        self.status = status
        self.version = version
        self.headers = headers
        self.body = body

    def __getitem__(self, name):
        return self.headers.get(name.lower())

    @property
    def text(self):
        return self.body.decode("utf-8")

    def content_type(self):
        return (self["content-type"] or "").replace(" ", "")


class Connection:
    """A raw HTTP/1.x client: one socket, requests written by hand, so the
    tests see exactly what the server sends (chunks, closes)."""

    def __init__(self, top=TOP):
        self.sock = socket.create_connection(address(top), timeout=TIMEOUT_S)
        self.buffer = b""

    def send(self, method, path, headers=None, body=b"", version="1.1", close=False):
        if isinstance(body, str):
            body = body.encode("utf-8")
        lines = ["%s %s HTTP/%s" % (method, path, version), "Host: %s:%d" % address()]
        headers = dict(headers or {})
        if close:
            headers.setdefault("Connection", "close")
        if method == "POST" or body:
            headers.setdefault("Content-Length", str(len(body)))
        lines += ["%s: %s" % item for item in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buffer += data

    def read_exactly(self, count):
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read_line(self):
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_head(self):
        status_line = self.read_line().decode("latin-1")
        version, status = status_line.split(" ")[0], int(status_line.split(" ")[1])
        headers = {}
        while True:
            line = self.read_line().decode("latin-1")
            if not line:
                break
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), value.strip())
        return version, status, headers

    def read_chunk(self):
        """The next chunk's data; None after the last chunk."""
        size = int(self.read_line().split(b";")[0], 16)
        if size == 0:
            self.read_line()
            return None
        data = self.read_exactly(size)
        assert self.read_exactly(2) == b"\r\n"
        return data

    def read_to_end(self):
        while True:
            try:
                self._fill()
            except (EOFError, ConnectionResetError):
                data, self.buffer = self.buffer, b""
                return data

    def is_closed(self, wait_s=2.0):
        """True once the server closed the connection (and sent nothing more)."""
        self.sock.settimeout(wait_s)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT_S)

    def response(self, method):
        version, status, headers = self.read_head()
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                chunk = self.read_chunk()
                if chunk is None:
                    break
                body += chunk
        elif "content-length" in headers:
            body = self.read_exactly(int(headers["content-length"]))
        else:
            body = self.read_to_end()
        return Response(status, version, headers, body)

    def close(self):
        self.sock.close()


def request(method, path, headers=None, body=b"", top=TOP):
    connection = Connection(top)
    try:
        connection.send(method, path, headers, body, close=True)
        return connection.response(method)
    finally:
        connection.close()


def GET(path, headers=None, top=TOP):
    return request("GET", path, headers, top=top)


def POST(path, body=b"", headers=None, top=TOP):
    return request("POST", path, headers, body, top=top)


def OPTIONS(path, headers=None):
    return request("OPTIONS", path, headers)


class Stream:
    """A streaming response read frame by frame (one chunk per frame)."""

    def __init__(self, method, path, headers=None, top=TOP, version="1.1"):
        self.connection = Connection(top)
        self.connection.send(method, path, headers, version=version)
        self.version, self.status, self.headers = self.connection.read_head()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"

    def __getitem__(self, name):
        return self.headers.get(name.lower())

    def content_type(self):
        return (self["content-type"] or "").replace(" ", "")

    def read(self, heartbeats=False):
        """The next chunk as text (heartbeats skipped unless asked for); None at the end."""
        while True:
            chunk = self.connection.read_chunk()
            if chunk is None:
                return None
            text = chunk.decode("utf-8")
            if heartbeats or text not in HEARTBEATS:
                return text

    def close(self):
        self.connection.close()


def websocket(path, top=TOP):
    host, port = address(top)
    return ws_connect("ws://%s:%d%s" % (host, port, path), open_timeout=TIMEOUT_S, close_timeout=2)


def ws_recv(ws, heartbeats=False):
    while True:
        message = ws.recv(timeout=TIMEOUT_S)
        if heartbeats or message != "h":
            return message


class Base(unittest.TestCase):
    maxDiff = None

    def assert_content_type(self, response, expected):
        self.assertEqual(response.content_type(), expected)

    def assert_no_cookie(self, response):
        self.assertIsNone(response["set-cookie"])

    def assert_cors(self, response, origin=None):
        if origin:
            self.assertEqual(response["access-control-allow-origin"], origin)
            self.assertEqual(response["access-control-allow-credentials"], "true")
        else:
            self.assertEqual(response["access-control-allow-origin"], "*")
            self.assertIsNone(response["access-control-allow-credentials"])

    def assert_not_cached(self, response):
        self.assertEqual(response["cache-control"], NO_CACHE)
        self.assertIsNone(response["expires"])
        self.assertIsNone(response["last-modified"])

    def assert_cached_for_long(self, response):
        self.assertIn("public", response["cache-control"])
        max_age = re.search(r"max-age=(\d+)", response["cache-control"])
        self.assertTrue(max_age and int(max_age.group(1)) >= 1000000, response["cache-control"])
        self.assertTrue(response["expires"])

    def assert_preflight(self, path, methods):
        for origin in ["test", "null"]:
            response = OPTIONS(path, {"Origin": origin, "Access-Control-Request-Method": methods})
            self.assertIn(response.status, (200, 204))
            self.assert_cached_for_long(response)
            self.assertGreater(int(response["access-control-max-age"]), 1000000)
            for method in methods.split(","):
                self.assertIn(method.strip(), response["access-control-allow-methods"])
            self.assertEqual(response.body, b"")
            self.assert_cors(response, origin)

    def assert_405(self, response):
        self.assertEqual(response.status, 405)
        self.assertIsNone(response["content-type"])
        self.assertTrue(response["allow"])
        self.assertEqual(response.body, b"")

    def assert_callback_checked(self, transport):
        """The callback is required, and only `[a-zA-Z0-9_.-]` may name it."""
        response = GET(ECHO + "/a/a/" + transport)
        self.assertEqual(response.status, 500)
        self.assertIn('"callback" parameter required', response.text)
        for callback in ["%20", "*", "abc(", "abc%28"]:
            response = GET(ECHO + "/a/a/%s?c=%s" % (transport, callback))
            self.assertEqual(response.status, 500)
            self.assertIn('invalid "callback" parameter', response.text)

    def open_xhr(self, url):
        response = POST(url + "/xhr")
        self.assertEqual((response.status, response.text), (200, "o\n"))


class Greeting(Base):
    def test_greeting(self):
        for path in [ECHO, ECHO + "/"]:
            response = GET(path)
            self.assertEqual(response.status, 200)
            self.assert_content_type(response, "text/plain;charset=UTF-8")
            self.assertEqual(response.text, "Welcome to SockJS!\n")
            self.assert_no_cookie(response)

    def test_other_paths_are_not_found(self):
        for suffix in ["/a", "/a.html", "//", "///", "/a/a", "/a/a/", "/a/"]:
            self.assertEqual(GET(ECHO + suffix).status, 404, suffix)


class Iframe(Base):
    BODY = re.compile(
        r"^<!DOCTYPE html>\n<html>\n<head>\n"
        r'  <meta http-equiv="X-UA-Compatible" content="IE=edge" />\n'
        r'  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />\n'
        r'  <script src="(?P<url>[^"]*)"></script>\n'
        r"  <script>\n    document.domain = document.domain;\n    SockJS.bootstrap_iframe\(\);\n  </script>\n"
        r"</head>\n<body>\n  <h2>Don't panic!</h2>\n"
        r"  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>\n</body>\n</html>$"
    )

    def check(self, path):
        response = GET(path)
        self.assertEqual(response.status, 200, path)
        self.assert_content_type(response, "text/html;charset=UTF-8")
        self.assert_cached_for_long(response)
        self.assertTrue(response["etag"])
        self.assertIsNone(response["last-modified"])
        match = self.BODY.match(response.text.strip())
        self.assertTrue(match, response.text)
        self.assertTrue(match.group("url").startswith(("/", "http")))
        self.assert_no_cookie(response)

    def test_names(self):
        for name in ["/iframe.html", "/iframe-a.html", "/iframe-.html", "/iframe-0.1.2.html",
                     "/iframe-0.1.2abc-dirty.2144.html", "/iframe-a.html?t=1234", "/iframe-1.6.1.html?t=qwe1"]:
            self.check(ECHO + name)

    def test_bad_names(self):
        for name in ["/iframe.htm", "/iframe", "/IFRAME.HTML", "/IFRAME", "/iframe.HTML", "/iframe.xml",
                     "/iframe-/.html"]:
            self.assertEqual(GET(ECHO + name).status, 404, name)

    def test_etag(self):
        first, second = GET(ECHO + "/iframe.html"), GET(ECHO + "/iframe.html")
        self.assertTrue(first["etag"])
        self.assertEqual(first["etag"], second["etag"])
        cached = GET(ECHO + "/iframe.html", {"If-None-Match": first["etag"]})
        self.assertEqual(cached.status, 304)
        self.assertIsNone(cached["content-type"])
        self.assertEqual(cached.body, b"")
        self.assertEqual(GET(ECHO + "/iframe.html", {"If-None-Match": '"other"'}).status, 200)


class Info(Base):
    def test_basic(self):
        response = GET(ECHO + "/info", {"Origin": "test"})
        self.assertEqual(response.status, 200)
        self.assert_content_type(response, "application/json;charset=UTF-8")
        self.assert_no_cookie(response)
        self.assert_not_cached(response)
        self.assert_cors(response, "test")
        data = json.loads(response.text)
        self.assertIs(data["websocket"], True)
        self.assertIn(data["cookie_needed"], (True, False))
        self.assertEqual(data["origins"], ["*:*"])
        self.assertIsInstance(data["entropy"], int)
        self.assertTrue(0 <= data["entropy"] < 2 ** 32)

    def test_without_origin(self):
        self.assert_cors(GET(ECHO + "/info"))

    def test_entropy_changes(self):
        first = json.loads(GET(ECHO + "/info").text)["entropy"]
        second = json.loads(GET(ECHO + "/info").text)["entropy"]
        self.assertNotEqual(first, second)

    def test_preflight(self):
        self.assert_preflight(ECHO + "/info", "OPTIONS, GET")

    def test_null_origin(self):
        response = OPTIONS(ECHO + "/info", {"Origin": "null", "Access-Control-Request-Method": "POST"})
        self.assertIn(response.status, (200, 204))
        self.assertEqual(response.body, b"")
        self.assertEqual(response["access-control-allow-origin"], "null")

    def test_websocket_disabled(self):
        response = GET(NO_WS + "/info")
        self.assertEqual(response.status, 200)
        self.assertIs(json.loads(response.text)["websocket"], False)

    def test_other_methods(self):
        self.assert_405(POST(ECHO + "/info"))


class SessionUrls(Base):
    def test_any_server_and_session(self):
        tag = uuid.uuid4().hex[:8]
        for part in ["/a/a" + tag, "/_/_" + tag, "/1/" + tag, "/abcdefgh_i-j%20/abcdefg_i-j%20" + tag]:
            self.open_xhr(ECHO + part)

    def test_bad_paths(self):
        for part in ["//", "/a./a", "/a/a.", "/./.", "/", "///"]:
            self.assertEqual(GET(ECHO + part + "/xhr").status, 404, part)
            self.assertEqual(POST(ECHO + part + "/xhr").status, 404, part)

    def test_server_id_is_ignored(self):
        session = str(uuid.uuid4())
        self.open_xhr("%s/000/%s" % (ECHO, session))
        response = POST("%s/000/%s/xhr_send" % (ECHO, session), '["a"]')
        self.assertEqual((response.status, response.body), (204, b""))
        response = POST("%s/999/%s/xhr" % (ECHO, session))
        self.assertEqual((response.status, response.text), (200, 'a["a"]\n'))


class Protocol(Base):
    def test_simple_session(self):
        url = session_url()
        self.open_xhr(url)
        response = POST(url + "/xhr_send", '["a"]')
        self.assertEqual((response.status, response.body), (204, b""))
        response = POST(url + "/xhr")
        self.assertEqual((response.status, response.text), (200, 'a["a"]\n'))
        self.assertEqual(POST(ECHO + "/000/bad_session/xhr_send", '["a"]').status, 404)

    def test_one_receiving_request_at_a_time(self):
        url = session_url()
        self.open_xhr(url)
        waiting = Connection()
        waiting.send("POST", url + "/xhr")
        time.sleep(0.25)
        second = POST(url + "/xhr")
        self.assertEqual((second.status, second.text), (200, 'c[2010,"Another connection still open"]\n'))
        # The first poll still gets what comes.
        self.assertEqual(POST(url + "/xhr_send", '["late"]').status, 204)
        self.assertEqual(waiting.response("POST").text, 'a["late"]\n')
        waiting.close()

    def test_close_session(self):
        url = session_url(CLOSE)
        self.open_xhr(url)
        for _ in range(2):
            response = POST(url + "/xhr")
            self.assertEqual((response.status, response.text), (200, 'c[3000,"Go away!"]\n'))

    def test_waiting_poll_gets_messages_at_once(self):
        url = session_url()
        self.open_xhr(url)
        waiting = Connection()
        waiting.send("POST", url + "/xhr")
        time.sleep(0.25)
        started = time.monotonic()
        self.assertEqual(POST(url + "/xhr_send", '["now"]').status, 204)
        self.assertEqual(waiting.response("POST").text, 'a["now"]\n')
        self.assertLess(time.monotonic() - started, 2)
        waiting.close()


class WebSocketErrors(Base):
    def test_plain_get(self):
        response = GET(ECHO + "/0/0/websocket")
        self.assertEqual(response.status, 400)
        self.assertIn('Can "Upgrade" only to "WebSocket".', response.text)

    def test_connection_header(self):
        response = GET(ECHO + "/0/0/websocket", {"Upgrade": "WebSocket", "Connection": "close"})
        self.assertEqual(response.status, 400)
        self.assertIn('"Connection" must be "Upgrade".', response.text)

    def test_only_get(self):
        for headers in [{"Upgrade": "WebSocket", "Connection": "Upgrade"}, {}]:
            self.assert_405(POST(ECHO + "/0/0/websocket", headers=headers))

    def test_disabled(self):
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
        self.assertEqual(GET(NO_WS + "/0/0/websocket", headers).status, 404)
        self.assertEqual(GET(NO_WS + "/websocket", headers).status, 404)


class WebSocket(Base):
    def test_transport(self):
        with websocket(session_url() + "/websocket") as ws:
            self.assertEqual(ws_recv(ws), "o")
            ws.send('["a"]')
            self.assertEqual(ws_recv(ws), 'a["a"]')
            ws.send('"single"')
            self.assertEqual(ws_recv(ws), 'a["single"]')
            ws.send('["b","c"]')
            self.assertEqual(ws_recv(ws), 'a["b","c"]')

    def test_close(self):
        with websocket(session_url(CLOSE) + "/websocket") as ws:
            self.assertEqual(ws_recv(ws), "o")
            self.assertEqual(ws_recv(ws), 'c[3000,"Go away!"]')
            with self.assertRaises(ConnectionClosed):
                ws.recv(timeout=TIMEOUT_S)

    def test_handshake_headers(self):
        key = base64.b64encode(os.urandom(16)).decode()
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        connection = Connection()
        connection.send("GET", session_url() + "/websocket", {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Origin": "http://asd", "Sec-WebSocket-Key": key})
        _, status, headers = connection.read_head()
        self.assertEqual(status, 101)
        self.assertEqual(headers["sec-websocket-accept"], accept.decode())
        self.assertEqual(headers["connection"].lower(), "upgrade")
        self.assertEqual(headers["upgrade"].lower(), "websocket")
        self.assertNotIn("content-length", headers)
        connection.close()

    def test_firefox_connection_header(self):
        connection = Connection()
        connection.send("GET", session_url() + "/websocket", {
            "Upgrade": "websocket", "Connection": "keep-alive, Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()})
        self.assertEqual(connection.read_head()[1], 101)
        connection.close()

    def test_empty_frames_are_ignored(self):
        with websocket(session_url() + "/websocket") as ws:
            self.assertEqual(ws_recv(ws), "o")
            ws.send("")
            ws.send("[]")
            ws.send('["a"]')
            self.assertEqual(ws_recv(ws), 'a["a"]')

    def test_session_id_reuse(self):
        url = session_url() + "/websocket"
        with websocket(url) as first, websocket(url) as second:
            self.assertEqual(ws_recv(first), "o")
            self.assertEqual(ws_recv(second), "o")
            first.send('["a"]')
            self.assertEqual(ws_recv(first), 'a["a"]')
            second.send('["b"]')
            self.assertEqual(ws_recv(second), 'a["b"]')
        with websocket(url) as again:
            self.assertEqual(ws_recv(again), "o")
            again.send('["a"]')
            self.assertEqual(ws_recv(again), 'a["a"]')

    def test_broken_json_ends_the_connection(self):
        with websocket(session_url() + "/websocket") as ws:
            self.assertEqual(ws_recv(ws), "o")
            ws.send('["a')
            self.assertEqual(ws_recv(ws), 'c[1002,"Broken framing."]')
            with self.assertRaises(ConnectionClosed):
                ws.recv(timeout=TIMEOUT_S)


class XhrPolling(Base):
    def test_preflight(self):
        for suffix in ["/xhr", "/xhr_send"]:
            self.assert_preflight(ECHO + "/abc/abc" + suffix, "OPTIONS, POST")

    def test_transport(self):
        url = session_url()
        response = POST(url + "/xhr", headers={"Origin": "test"})
        self.assertEqual((response.status, response.text), (200, "o\n"))
        self.assert_content_type(response, "application/javascript;charset=UTF-8")
        self.assert_cors(response, "test")
        self.assert_not_cached(response)
        self.assert_no_cookie(response)
        response = POST(url + "/xhr_send", '["x"]', {"Origin": "test"})
        self.assertEqual((response.status, response.body), (204, b""))
        self.assert_content_type(response, "text/plain;charset=UTF-8")
        self.assert_cors(response, "test")
        self.assert_not_cached(response)
        response = POST(url + "/xhr")
        self.assertEqual((response.status, response.text), (200, 'a["x"]\n'))

    def test_unknown_session(self):
        self.assertEqual(POST(session_url() + "/xhr_send", '["x"]').status, 404)

    def test_bad_payloads(self):
        url = session_url()
        self.open_xhr(url)
        response = POST(url + "/xhr_send", '["x')
        self.assertEqual(response.status, 500)
        self.assertIn("Broken JSON encoding.", response.text)
        for payload in ["", "   "]:
            response = POST(url + "/xhr_send", payload)
            self.assertEqual(response.status, 500)
            self.assertIn("Payload expected.", response.text)
        for payload in ["[1]", "{}", '["a"] x']:
            self.assertEqual(POST(url + "/xhr_send", payload).status, 500, payload)
        response = POST(url + "/xhr_send", '["a"]')
        self.assertEqual((response.status, response.body), (204, b""))
        self.assertEqual(POST(url + "/xhr").text, 'a["a"]\n')

    def test_any_content_type(self):
        url = session_url()
        self.open_xhr(url)
        types = ["text/plain", "T", "application/json", "application/xml", "", "application/json; charset=utf-8",
                 "text/xml; charset=utf-8", "text/xml"]
        for content_type in types:
            response = POST(url + "/xhr_send", '["a"]', {"Content-Type": content_type})
            self.assertEqual((response.status, response.body), (204, b""))
        self.assertEqual(POST(url + "/xhr").text, "a[" + ",".join(['"a"'] * len(types)) + "]\n")

    def test_request_headers_are_echoed(self):
        base = {"Origin": "test", "Access-Control-Request-Method": "POST"}
        response = OPTIONS(session_url() + "/xhr", dict(base, **{"Access-Control-Request-Headers": "a, b, c"}))
        self.assertIn(response.status, (200, 204))
        self.assert_cors(response, "test")
        self.assertEqual(response["access-control-allow-headers"], "a, b, c")
        for headers in [dict(base, **{"Access-Control-Request-Headers": ""}), base]:
            response = OPTIONS(session_url() + "/xhr", headers)
            self.assertIn(response.status, (200, 204))
            self.assert_cors(response, "test")
            self.assertFalse(response["access-control-allow-headers"])

    def test_empty_frames(self):
        url = session_url()
        self.open_xhr(url)
        self.assertEqual(POST(url + "/xhr_send", "[]").status, 204)
        self.assertEqual(POST(url + "/xhr_send", '[""]').status, 204)
        self.assertEqual(POST(url + "/xhr").text, 'a[""]\n')

    def test_wrong_method(self):
        self.assert_405(GET(session_url() + "/xhr"))
        self.assert_405(GET(session_url() + "/xhr_send"))


class XhrStreaming(Base):
    def test_preflight(self):
        self.assert_preflight(ECHO + "/abc/abc/xhr_streaming", "OPTIONS, POST")

    def test_transport(self):
        url = session_url()
        stream = Stream("POST", url + "/xhr_streaming", {"Origin": "test", "Content-Length": "0"})
        self.assertEqual(stream.status, 200)
        self.assert_content_type(stream, "application/javascript;charset=UTF-8")
        self.assert_cors(stream, "test")
        self.assert_not_cached(stream)
        self.assertEqual(stream.read(), "h" * 2048 + "\n")
        self.assertEqual(stream.read(), "o\n")
        response = POST(url + "/xhr_send", '["x"]')
        self.assertEqual((response.status, response.body), (204, b""))
        self.assertEqual(stream.read(), 'a["x"]\n')
        stream.close()

    def test_response_limit(self):
        # The test server ends a stream after 4096 bytes of frames.
        url = session_url()
        stream = Stream("POST", url + "/xhr_streaming", {"Content-Length": "0"})
        self.assertEqual(stream.status, 200)
        self.assertTrue(stream.read())
        self.assertEqual(stream.read(), "o\n")
        message = '"' + "x" * 128 + '"'
        for _ in range(31):
            self.assertEqual(POST(url + "/xhr_send", "[" + message + "]").status, 204)
            self.assertEqual(stream.read(), "a[" + message + "]\n")
        self.assertIsNone(stream.read())
        stream.close()
        # The session goes on: the next stream gets what came in between.
        self.assertEqual(POST(url + "/xhr_send", '["after"]').status, 204)
        self.assertEqual(POST(url + "/xhr").text, 'a["after"]\n')


class EventSource(Base):
    def test_transport(self):
        url = session_url()
        stream = Stream("GET", url + "/eventsource")
        self.assertEqual(stream.status, 200)
        self.assert_content_type(stream, "text/event-stream")
        self.assert_not_cached(stream)
        self.assertEqual(stream.read(), "\r\n")
        self.assertEqual(stream.read(), "data: o\r\n\r\n")
        self.assertEqual(POST(url + "/xhr_send", '["x"]').status, 204)
        self.assertEqual(stream.read(), 'data: a["x"]\r\n\r\n')
        # Leading spaces, NUL, CR and LF travel escaped.
        self.assertEqual(POST(url + "/xhr_send", r'["  \u0000\n\r "]').status, 204)
        self.assertEqual(stream.read(), 'data: a["  \\u0000\\u000a\\u000d "]\r\n\r\n')
        stream.close()

    def test_response_limit(self):
        url = session_url()
        stream = Stream("GET", url + "/eventsource")
        self.assertTrue(stream.read())
        self.assertEqual(stream.read(), "data: o\r\n\r\n")
        message = '"' + "x" * 4096 + '"'
        self.assertEqual(POST(url + "/xhr_send", "[" + message + "]").status, 204)
        self.assertEqual(stream.read(), "data: a[" + message + "]\r\n\r\n")
        self.assertIsNone(stream.read())
        stream.close()


class HtmlFile(Base):
    HEAD = (
        "<!doctype html>\n<html><head>\n"
        '  <meta http-equiv="X-UA-Compatible" content="IE=edge" />\n'
        '  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />\n'
        "</head><body><h2>Don't panic!</h2>\n  <script>\n    document.domain = document.domain;\n"
        "    var c = parent.%s;\n    c.start();\n    function p(d) {c.message(d);};\n"
        "    window.onload = function() {c.stop();};\n  </script>"
    )

    def test_transport(self):
        url = session_url()
        stream = Stream("GET", url + "/htmlfile?c=%63allback")
        self.assertEqual(stream.status, 200)
        self.assert_content_type(stream, "text/html;charset=UTF-8")
        self.assert_not_cached(stream)
        prelude = stream.read()
        self.assertEqual(prelude.strip(), self.HEAD % "callback")
        self.assertGreater(len(prelude), 1024)
        self.assertEqual(stream.read(), '<script>\np("o");\n</script>\r\n')
        self.assertEqual(POST(url + "/xhr_send", '["x"]').status, 204)
        self.assertEqual(stream.read(), '<script>\np("a[\\"x\\"]");\n</script>\r\n')
        # A message cannot end the script element it travels in.
        self.assertEqual(POST(url + "/xhr_send", '["</script><b>&"]').status, 204)
        piece = stream.read()
        self.assertEqual(piece.count("</script>"), 1)
        self.assertNotIn("<b>", piece)
        stream.close()

    def test_callback(self):
        self.assert_callback_checked("htmlfile")

    def test_response_limit(self):
        url = session_url()
        stream = Stream("GET", url + "/htmlfile?c=callback")
        self.assertTrue(stream.read())
        self.assertEqual(stream.read(), '<script>\np("o");\n</script>\r\n')
        message = "x" * 4096
        self.assertEqual(POST(url + "/xhr_send", '["' + message + '"]').status, 204)
        self.assertEqual(stream.read(), '<script>\np("a[\\"' + message + '\\"]");\n</script>\r\n')
        self.assertIsNone(stream.read())
        stream.close()


class JsonPolling(Base):
    FORM = {"Content-Type": "application/x-www-form-urlencoded"}

    def test_transport(self):
        url = session_url()
        response = GET(url + "/jsonp?c=%63allback")
        self.assertEqual(response.status, 200)
        self.assert_content_type(response, "application/javascript;charset=UTF-8")
        self.assert_not_cached(response)
        self.assertEqual(response.text, '/**/callback("o");\r\n')
        response = POST(url + "/jsonp_send", "d=%5B%22x%22%5D", self.FORM)
        self.assertEqual((response.status, response.text), (200, "ok"))
        self.assert_content_type(response, "text/plain;charset=UTF-8")
        self.assert_not_cached(response)
        response = GET(url + "/jsonp?c=%63allback")
        self.assertEqual((response.status, response.text), (200, '/**/callback("a[\\"x\\"]");\r\n'))

    def test_callback(self):
        self.assert_callback_checked("jsonp")

    def test_bad_payloads(self):
        url = session_url()
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("o");\r\n')
        response = POST(url + "/jsonp_send", "d=%5B%22x", self.FORM)
        self.assertEqual(response.status, 500)
        self.assertIn("Broken JSON encoding.", response.text)
        for payload in ["", "d=", "p=p"]:
            response = POST(url + "/jsonp_send", payload, self.FORM)
            self.assertEqual(response.status, 500)
            self.assertIn("Payload expected.", response.text)
        self.assertEqual(POST(url + "/jsonp_send", "d=%5B%22b%22%5D", self.FORM).text, "ok")
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("a[\\"b\\"]");\r\n')

    def test_form_or_plain_body(self):
        url = session_url()
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("o");\r\n')
        self.assertEqual(POST(url + "/jsonp_send", "d=%5B%22abc%22%5D", self.FORM).text, "ok")
        self.assertEqual(POST(url + "/jsonp_send", '["%61bc"]', {"Content-Type": "text/plain"}).text, "ok")
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("a[\\"abc\\",\\"%61bc\\"]");\r\n')

    def test_close(self):
        url = session_url(CLOSE)
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("o");\r\n')
        for _ in range(2):
            self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("c[3000,\\"Go away!\\"]");\r\n')

    def test_empty_frames(self):
        url = session_url()
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("o");\r\n')
        self.assertEqual(POST(url + "/jsonp_send", "d=%5B%5D", self.FORM).text, "ok")
        self.assertEqual(POST(url + "/jsonp_send", "d=%5B%22x%22%5D", self.FORM).text, "ok")
        self.assertEqual(GET(url + "/jsonp?c=x").text, '/**/x("a[\\"x\\"]");\r\n')


class JsessionId(Base):
    def assert_cookie(self, response, value="dummy"):
        parts = [part.strip() for part in response["set-cookie"].split(";")]
        self.assertEqual(parts[0], "JSESSIONID=" + value)
        self.assertEqual(parts[1].lower(), "path=/")

    def test_info(self):
        response = GET(COOKIE + "/info")
        self.assertEqual(response.status, 200)
        self.assert_no_cookie(response)
        self.assertIs(json.loads(response.text)["cookie_needed"], True)
        self.assertIs(json.loads(GET(ECHO + "/info").text)["cookie_needed"], False)

    def test_xhr(self):
        response = POST(session_url(COOKIE) + "/xhr")
        self.assertEqual(response.text, "o\n")
        self.assert_cookie(response)
        response = POST(session_url(COOKIE) + "/xhr", headers={"Cookie": "a=b; JSESSIONID=abcdef"})
        self.assertEqual(response.text, "o\n")
        self.assert_cookie(response, "abcdef")
        # Only services that ask for it set the cookie.
        self.assert_no_cookie(POST(session_url() + "/xhr"))

    def test_streams(self):
        for method, suffix in [("POST", "/xhr_streaming"), ("GET", "/eventsource"), ("GET", "/htmlfile?c=cb")]:
            stream = Stream(method, session_url(COOKIE) + suffix, {"Content-Length": "0"} if method == "POST" else {})
            self.assertEqual(stream.status, 200)
            self.assert_cookie(stream)
            stream.close()

    def test_jsonp(self):
        url = session_url(COOKIE)
        response = GET(url + "/jsonp?c=%63allback")
        self.assertEqual(response.text, '/**/callback("o");\r\n')
        self.assert_cookie(response)
        response = POST(url + "/jsonp_send", "d=%5B%22x%22%5D", {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual((response.status, response.text), (200, "ok"))
        self.assert_cookie(response)


class RawWebSocket(Base):
    def test_transport(self):
        with websocket(ECHO + "/websocket") as ws:
            ws.send("Hello world!\uffff")
            self.assertEqual(ws.recv(timeout=TIMEOUT_S), "Hello world!\uffff")

    def test_close(self):
        with websocket(CLOSE + "/websocket") as ws:
            with self.assertRaises(ConnectionClosed) as closed:
                ws.recv(timeout=TIMEOUT_S)
            self.assertEqual(closed.exception.rcvd.code, 3000)
            self.assertEqual(closed.exception.rcvd.reason, "Go away!")


def escaped(code_points):
    return '"' + "".join("\\u%04x" % c for c in code_points) + '"'


class Encoding(Base):
    # What the server must escape: control characters, zero-width and
    # directional marks, line and paragraph separators, invisible
    # operators, specials (and surrogates, which cannot travel raw).
    SERVER_ESCAPES = [c for c in range(0x20, 0x10000)
                      if 0x200C <= c <= 0x200F or 0x2028 <= c <= 0x202F or 0x2060 <= c <= 0x206F
                      or c >= 0xFFF0]
    # What browsers mangle and clients therefore send escaped, surrogates
    # (unpaired, as JavaScript strings may hold them) included.
    CLIENT_ESCAPES = ([0x22, 0x5C] + list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)) + [0xAD]
                      + list(range(0x600, 0x605)) + [0x70F, 0x17B4, 0x17B5] + list(range(0x2000, 0x2100))
                      + [0xFEFF] + list(range(0xD800, 0xE000)) + list(range(0xFFF0, 0x10000)))

    def test_server_escapes(self):
        url = session_url()
        self.open_xhr(url)
        raw = "".join(chr(c) for c in self.SERVER_ESCAPES)
        self.assertEqual(POST(url + "/xhr_send", '["' + raw + '"]').status, 204)
        response = POST(url + "/xhr")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.text.strip()[2:-1], escaped(self.SERVER_ESCAPES))

    def test_control_characters_go_out_escaped(self):
        url = session_url()
        self.open_xhr(url)
        self.assertEqual(POST(url + "/xhr_send", '["' + escaped(range(0x20))[1:-1] + '"]').status, 204)
        self.assertEqual(POST(url + "/xhr").text.strip()[2:-1], escaped(range(0x20)))

    def test_server_decodes_what_clients_escape(self):
        url = session_url()
        self.open_xhr(url)
        sent = escaped(self.CLIENT_ESCAPES)
        self.assertEqual(POST(url + "/xhr_send", "[" + sent + "]").status, 204)
        response = POST(url + "/xhr")
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.text.strip()[2:-1]), json.loads(sent))

    def test_unicode_round_trip_over_websocket(self):
        text = "zażółć 😀 \u2028 \ud800"
        with websocket(session_url() + "/websocket") as ws:
            self.assertEqual(ws_recv(ws), "o")
            ws.send(json.dumps([text]))
            self.assertEqual(json.loads(ws_recv(ws)[1:]), [text])


class HandlingClose(Base):
    INTERRUPTED = 'c[1002,"Connection interrupted"]\n'
    ANOTHER = 'c[2010,"Another connection still open"]\n'

    def stream(self, url):
        """An xhr_streaming request, past its prelude."""
        stream = Stream("POST", url + "/xhr_streaming")
        self.assertEqual(stream.read(), "h" * 2048 + "\n")
        return stream

    def after_abort(self, receive):
        """What a receiving request gets once the server saw the abort
        (before, it may still get 2010)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            got = receive()
            if got != self.ANOTHER or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def test_close_frame_for_every_request(self):
        url = session_url(CLOSE)
        first = self.stream(url)
        self.assertEqual(first.read(), "o\n")
        self.assertEqual(first.read(), 'c[3000,"Go away!"]\n')
        second = self.stream(url)
        self.assertEqual(second.read(), 'c[3000,"Go away!"]\n')
        self.assertIsNone(first.read())
        self.assertIsNone(second.read())
        first.close()
        second.close()

    def test_second_stream_is_refused(self):
        url = session_url()
        first = self.stream(url)
        self.assertEqual(first.read(), "o\n")
        second = self.stream(url)
        self.assertEqual(second.read(), self.ANOTHER)
        self.assertIsNone(second.read())
        first.close()
        second.close()

    def test_aborted_stream_closes_the_session(self):
        # The protocol allows a new session or the close frame; Kometa
        # closes the session (1002) and says so.
        url = session_url()
        first = self.stream(url)
        self.assertEqual(first.read(), "o\n")
        first.close()

        def receive():
            again = self.stream(url)
            got = again.read()
            again.close()
            return got
        self.assertEqual(self.after_abort(receive), self.INTERRUPTED)

    def test_aborted_poll_closes_the_session(self):
        url = session_url()
        self.open_xhr(url)
        waiting = Connection()
        waiting.send("POST", url + "/xhr")
        time.sleep(0.25)
        self.assertEqual(POST(url + "/xhr").text, self.ANOTHER)
        waiting.close()
        self.assertEqual(self.after_abort(lambda: POST(url + "/xhr").text), self.INTERRUPTED)


class Http(Base):
    def test_http10_keep_alive(self):
        connection = Connection()
        connection.send("GET", ECHO, {"Connection": "Keep-Alive"}, version="1.0")
        response = connection.response("GET")
        self.assertEqual(response.status, 200)
        self.assertNotIn("transfer-encoding", response.headers)
        self.assertEqual(response.text, "Welcome to SockJS!\n")
        self.assertEqual(response["connection"].lower(), "keep-alive")
        connection.send("GET", ECHO, {"Connection": "Keep-Alive"}, version="1.0")
        self.assertEqual(connection.response("GET").status, 200)
        connection.close()

    def test_http10_plain(self):
        connection = Connection()
        connection.send("GET", ECHO, version="1.0")
        self.assertEqual(connection.response("GET").text, "Welcome to SockJS!\n")
        self.assertTrue(connection.is_closed())
        connection.close()

    def test_http10_stream(self):
        stream = Stream("POST", session_url(CLOSE) + "/xhr_streaming", {"Connection": "Keep-Alive",
                                                                         "Content-Length": "0"}, version="1.0")
        self.assertEqual(stream.status, 200)
        self.assertNotIn("transfer-encoding", stream.headers)
        self.assertNotIn("content-length", stream.headers)
        body = stream.connection.read_to_end().decode()
        self.assertEqual(body, "h" * 2048 + "\n" + "o\n" + 'c[3000,"Go away!"]\n')
        stream.close()

    def test_http11_keep_alive(self):
        connection = Connection()
        connection.send("GET", ECHO, {"Connection": "Keep-Alive"})
        response = connection.response("GET")
        self.assertIn(response["connection"] or "", ["", "keep-alive"])
        self.assertEqual(response.text, "Welcome to SockJS!\n")
        connection.send("GET", ECHO)
        self.assertEqual(connection.response("GET").status, 200)
        connection.close()

    def test_http11_stream_is_chunked(self):
        stream = Stream("POST", session_url(CLOSE) + "/xhr_streaming", {"Content-Length": "0"})
        self.assertTrue(stream.chunked)
        self.assertNotIn("content-length", stream.headers)
        self.assertEqual(stream.read()[0], "h")
        self.assertEqual(stream.read(), "o\n")
        self.assertEqual(stream.read(), 'c[3000,"Go away!"]\n')
        self.assertIsNone(stream.read())
        # The connection carries the next request.
        stream.connection.send("GET", ECHO)
        self.assertEqual(stream.connection.response("GET").status, 200)
        stream.close()

    def test_post_without_content_length(self):
        connection = Connection()
        connection.sock.sendall(("POST %s/xhr HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                 % session_url()).encode())
        self.assertEqual(connection.response("POST").text, "o\n")
        connection.close()


@unittest.skipUnless(HEARTBEAT_TOP, "needs SOCKJS_HEARTBEAT_URL (a server with a short heartbeat)")
class Heartbeats(Base):
    def test_waiting_poll_gets_a_heartbeat(self):
        url = session_url()
        self.assertEqual(POST(url + "/xhr", top=HEARTBEAT_TOP).text, "o\n")
        started = time.monotonic()
        self.assertEqual(POST(url + "/xhr", top=HEARTBEAT_TOP).text, "h\n")
        self.assertLess(time.monotonic() - started, 5)

    def test_streams_get_heartbeats(self):
        for method, suffix, beat in [("POST", "/xhr_streaming", "h\n"), ("GET", "/eventsource", "data: h\r\n\r\n"),
                                     ("GET", "/htmlfile?c=cb", '<script>\np("h");\n</script>\r\n')]:
            headers = {"Content-Length": "0"} if method == "POST" else {}
            stream = Stream(method, session_url() + suffix, headers, top=HEARTBEAT_TOP)
            stream.read()
            self.assertIn("o", stream.read())
            self.assertEqual(stream.read(heartbeats=True), beat)
            self.assertEqual(stream.read(heartbeats=True), beat)
            stream.close()

    def test_websocket_gets_heartbeats(self):
        with websocket(session_url() + "/websocket", top=HEARTBEAT_TOP) as ws:
            self.assertEqual(ws_recv(ws), "o")
            self.assertEqual(ws_recv(ws, heartbeats=True), "h")


if __name__ == "__main__":
    unittest.main()
