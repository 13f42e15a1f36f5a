"""Raw clients for the tests: bytes over real loopback sockets, JSON decoded
to plain dicts, so the tests check the wire itself and not busd's own types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode

import h11
import trio


class JsonLinesClient:
    """One JSON-lines connection. ``call`` sends a request and returns the
    whole reply object (``result`` or ``error``) matched by id."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._next_id = 0
        self._buf = b""
        self._early: dict[Any, dict[str, Any]] = {}

    async def __aenter__(self) -> JsonLinesClient:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def read_line(self) -> bytes | None:
        """The next line from the server, or None at EOF."""
        while b"\n" not in self._buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    async def read_reply(self) -> dict[str, Any]:
        line = await self.read_line()
        assert line is not None, "connection closed"
        return json.loads(line)

    async def request(self, method: str, params: dict[str, Any] | None = None, rid: Any = None) -> Any:
        """Send one request, return its id without waiting."""
        if rid is None:
            self._next_id += 1
            rid = self._next_id
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send_raw(json.dumps(msg).encode() + b"\n")
        return rid

    async def reply_to(self, rid: Any) -> dict[str, Any]:
        """The reply for ``rid``; replies for other ids are kept for later."""
        while rid not in self._early:
            reply = await self.read_reply()
            self._early[reply.get("id")] = reply
        return self._early.pop(rid)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.reply_to(await self.request(method, params))


class HttpResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """A keep-alive HTTP/1.1 client on one connection (h11, client side)."""

    def __init__(self, port: int, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.port = port
        self.host = host
        self.token = token

    async def __aenter__(self) -> HttpClient:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def _connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> HttpResponse:
        if self.conn.our_state is not h11.IDLE:
            await self.stream.aclose()
            await self._connect()
        hdrs = [("host", f"{self.host}:{self.port}")]
        if self.token is not None:
            hdrs.append(("authorization", f"Bearer {self.token}"))
        for k, v in (headers or {}).items():
            hdrs.append((k, v))
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
            hdrs.append(("content-type", "application/json"))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body is not None:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        status = 0
        headers_out: dict[str, str] = {}
        payload = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers_out = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return HttpResponse(status, headers_out, payload)

    async def get(self, target: str, **kw: Any) -> HttpResponse:
        return await self.request("GET", target, **kw)

    async def post_json(self, target: str, obj: Any, **kw: Any) -> HttpResponse:
        return await self.request("POST", target, body=json.dumps(obj).encode(), **kw)


# The contract's table: error code -> HTTP status.
HTTP_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "too_large": 413,
    "rate_limited": 429,
    "inbox_full": 507,
    "unavailable": 503,
}


class Refused(Exception):
    """A request the bus refused: ``reason`` is the contract's error code;
    ``status`` the HTTP status or the JSON-RPC code; ``data`` the rest
    (HTTP: the ``error`` object plus ``headers``; JSON lines: the ``error``
    object); ``retry_after`` from wherever the transport puts it."""

    def __init__(self, reason: str, status: int, data: dict[str, Any], transport: str = "") -> None:
        super().__init__(f"{reason} ({status}): {data}")
        self.reason = reason
        self.status = status
        self.data = data
        self.transport = transport

    @property
    def retry_after(self) -> Any:
        if self.transport == "jsonl":
            return self.data["data"].get("retry_after")
        return self.data.get("retry_after")


async def refusal(aw: Awaitable[Any], reason: str) -> Refused:
    """Await a request that must be refused with ``reason``; over HTTP the
    status must be the contract's for that reason. Returns the refusal."""
    try:
        result = await aw
    except Refused as e:
        assert e.reason == reason, e
        if e.transport == "http":
            assert e.status == HTTP_STATUS[reason], e
        return e
    raise AssertionError(f"expected {reason}, got success: {result!r}")


class Transport:
    """The contract's operations over one transport, with the same results
    either way: a send's result dict, an inbox's message list."""

    name: str

    async def send(self, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def inbox(self, agent: str, **query: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def ack(self, agent: str, up_to: int) -> Any:
        """Cumulative ack, the transport's own way."""
        raise NotImplementedError

    async def auth(self, token: str) -> Any:
        raise NotImplementedError


class JsonLinesTransport(Transport):
    name = "jsonl"

    def __init__(self, client: JsonLinesClient) -> None:
        self.client = client

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        reply = await self.client.call(method, params)
        assert reply["jsonrpc"] == "2.0"
        if "error" in reply:
            err = reply["error"]
            assert isinstance(err["code"], int) and isinstance(err["message"], str), reply
            raise Refused(err["data"]["reason"], err["code"], err, "jsonl")
        return reply["result"]

    async def auth(self, token: str) -> Any:
        return await self._call("auth", {"token": token})

    async def send(self, **fields: Any) -> dict[str, Any]:
        return await self._call("send", _wire_fields(fields))

    async def inbox(self, agent: str, **query: Any) -> list[dict[str, Any]]:
        result = await self._call("inbox", {"agent": agent, **query})
        return result["messages"]

    async def ack(self, agent: str, up_to: int | None = None, ids: list[int] | None = None) -> int:
        """The ``ack`` method; returns ``acked``."""
        params: dict[str, Any] = {"agent": agent}
        if up_to is not None:
            params["up_to"] = up_to
        if ids is not None:
            params["ids"] = ids
        result = await self._call("ack", params)
        return result["acked"]

    async def agents(self) -> list[dict[str, Any]]:
        return (await self._call("agents", {}))["agents"]

    async def ping(self) -> dict[str, Any]:
        return await self._call("ping", {})

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats", {})


class HttpTransport(Transport):
    name = "http"

    def __init__(self, client: HttpClient) -> None:
        self.client = client

    def _check(self, resp: HttpResponse) -> dict[str, Any]:
        body = resp.json()
        assert resp.headers.get("content-type", "").startswith("application/json")
        if resp.status != 200:
            assert body["ok"] is False and set(body) == {"ok", "error"}, body
            err = body["error"]
            assert isinstance(err["code"], str) and isinstance(err["message"], str), body
            data = dict(err)
            data["headers"] = resp.headers
            raise Refused(err["code"], resp.status, data, "http")
        assert body["ok"] is True
        return body

    async def auth(self, token: str) -> Any:
        self.client.token = token
        return {"ok": True}

    async def send(self, **fields: Any) -> dict[str, Any]:
        body = self._check(await self.client.post_json("/api/send", _wire_fields(fields)))
        del body["ok"]
        return body

    async def inbox(self, agent: str, **query: Any) -> list[dict[str, Any]]:
        target = f"/api/inbox/{quote(agent, safe='')}"
        if query:
            target += "?" + urlencode(query)
        body = self._check(await self.client.get(target))
        assert body["agent"] == agent
        return body["messages"]

    async def ack(self, agent: str, up_to: int) -> None:
        """``GET /api/inbox/<agent>?ack=N``: HTTP has no ack count."""
        await self.inbox(agent, ack=up_to)


def _wire_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Python keyword ``from_`` -> wire ``from``."""
    out = dict(fields)
    if "from_" in out:
        out["from"] = out.pop("from_")
    return out


@asynccontextmanager
async def jsonl_transport(port: int) -> AsyncIterator[JsonLinesTransport]:
    async with JsonLinesClient(port) as c:
        yield JsonLinesTransport(c)


@asynccontextmanager
async def http_transport(port: int) -> AsyncIterator[HttpTransport]:
    async with HttpClient(port) as c:
        yield HttpTransport(c)


# ---- raw bytes ----------------------------------------------------------------


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return data
        if not chunk:
            return data
        data += chunk


async def exchange_raw(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Connect, write ``data``, half-close, return all the server says before
    it closes the connection."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the server may close before reading everything
        return await read_until_eof(stream)


def parse_http_responses(data: bytes) -> list[HttpResponse]:
    """Split raw bytes into the HTTP responses they hold (h11, client side)."""
    out = []
    while data:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(data)
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"incomplete HTTP response: {data[:200]!r}")
        out.append(HttpResponse(status, headers, body))
        data = conn.trailing_data[0]
    return out


def http_request_bytes(method: str, target: str, body: bytes | None = None, token: str | None = None) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def pipelined_sends(recipients: list[str], sender: str = "a") -> bytes:
    """JSON lines: one ``send`` per recipient, request ids and bodies 0, 1, 2, ..."""
    lines = [
        {"id": i, "method": "send", "params": {"from": sender, "to": to, "body": str(i)}}
        for i, to in enumerate(recipients)
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


# ---- helpers on a running bus -------------------------------------------------


async def wait_for_waiters(port: int, n: int = 1, token: str | None = None) -> None:
    """Return once the bus reports ``n`` long-polls waiting (``stats``)."""
    async with jsonl_transport(port) as t:
        if token is not None:
            await t.auth(token)
        while (await t.stats())["waiters"] < n:
            await trio.sleep(0.01)


class Witness:
    """A message sent (and acknowledged) before some abuse; ``check`` then
    proves, over both transports on fresh connections, that the bus still
    serves and still holds every acknowledged witness message."""

    AGENT = "keeper"

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self.ids: list[int] = []

    async def plant(self) -> Witness:
        async with jsonl_transport(self.port) as t:
            await self._plant_with(t)
        return self

    async def _plant_with(self, t: Transport) -> None:
        if self.token is not None:
            await t.auth(self.token)
        r = await t.send(from_="witness", to=self.AGENT, body=f"witness {len(self.ids)}")
        self.ids.append(r["id"])

    async def check(self) -> None:
        for factory in (jsonl_transport, http_transport):
            async with factory(self.port) as t:
                await self._plant_with(t)
                got = [m["id"] for m in await t.inbox(self.AGENT, limit=1000)]
                assert got == self.ids, (t.name, got, self.ids)
