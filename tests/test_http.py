"""The HTTP shim: reply bodies, query ranges, status codes for unknown paths
and wrong methods, /healthz, the HTTP-only port, pipelined requests."""

from __future__ import annotations

import json

import pytest
import trio

from .wireclients import HttpClient, exchange_raw, http_request_bytes, parse_http_responses


def error_of(resp, status: int) -> str:
    """The error code of a refusal with ``status``, after checking its shape."""
    body = resp.json()
    assert resp.status == status, (resp.status, body)
    assert resp.headers["content-type"].startswith("application/json")
    assert body["ok"] is False and set(body) == {"ok", "error"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str), body
    return body["error"]["code"]


async def test_send_and_inbox_reply_bodies(http):
    with trio.fail_after(5):
        resp = await http.post_json("/api/send", {"from": "a", "to": "b", "body": "hi"})
        sent = resp.json()
        assert resp.status == 200 and resp.headers["content-type"].startswith("application/json")
        assert set(sent) == {"ok", "id", "timestamp", "recipients"} and sent["ok"] is True
        resp = await http.get("/api/inbox/b")
        assert resp.status == 200
        assert resp.json() == {
            "ok": True,
            "agent": "b",
            "messages": [
                {"id": sent["id"], "from": "a", "to": "b", "subject": "", "body": "hi", "timestamp": sent["timestamp"]}
            ],
        }


async def test_healthz(http):
    with trio.fail_after(5):
        resp = await http.get("/healthz")
        assert resp.status == 200 and resp.json()["ok"] is True


async def test_head_gets_the_headers_without_a_body_and_the_connection_goes_on(http):
    with trio.fail_after(5):
        got = await http.get("/healthz")
        head = await http.request("HEAD", "/healthz")
        assert head.status == 200 and head.body == b""
        assert head.headers["content-length"] == str(len(got.body))  # what GET would send
        refused = await http.request("HEAD", "/api/send")  # not a GET route: 405, still without a body
        assert refused.status == 405 and refused.body == b"" and refused.headers["allow"] == "POST"
        again = await http.get("/healthz")  # the same keep-alive connection, in step
        assert again.status == 200 and again.json()["ok"] is True


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=-5",
        "limit=ten",
        "limit=1.5",
        "wait=-1",
        "wait=60.5",
        "wait=61",
        "wait=nan",
        "wait=inf",
        "wait=soon",
        "ack=-1",
        "ack=last",
    ],
)
async def test_query_out_of_range_is_bad_request(http, query):
    with trio.fail_after(5):
        assert error_of(await http.get(f"/api/inbox/b?{query}"), 400) == "bad_request"


async def test_query_bounds_are_accepted(http):
    with trio.fail_after(5):
        await http.post_json("/api/send", {"from": "a", "to": "b", "body": "so that wait=60 answers at once"})
        for query in ("limit=1", "limit=1000", "wait=0", "wait=60", "wait=0.5", "ack=0", "limit=2&wait=1&ack=0"):
            resp = await http.get(f"/api/inbox/b?{query}")
            assert resp.status == 200 and len(resp.json()["messages"]) == 1, query


@pytest.mark.parametrize(
    "target", ["/", "/nope", "/api", "/api/", "/api/inbox", "/api/sendx", "/api/send/x", "/healthz/x"]
)
async def test_unknown_path_is_404(http, target):
    with trio.fail_after(5):
        for method in ("GET", "POST"):
            resp = await http.request(method, target, body=b"{}" if method == "POST" else None)
            assert error_of(resp, 404) == "not_found", (method, target)


@pytest.mark.parametrize(
    "method, target",
    [
        ("GET", "/api/send"),
        ("PUT", "/api/send"),
        ("POST", "/api/inbox/b"),
        ("DELETE", "/api/inbox/b"),
        ("POST", "/healthz"),
    ],
)
async def test_wrong_method_is_405(http, method, target):
    with trio.fail_after(5):
        body = json.dumps({"from": "a", "to": "b", "body": "x"}).encode() if method in ("POST", "PUT") else None
        resp = await http.request(method, target, body=body)
        error_of(resp, 405)
    async with HttpClient(http.port) as fresh:
        assert (await fresh.get("/api/inbox/b")).json()["messages"] == []  # nothing was sent


async def test_http_only_port(start_bus):
    ep = await start_bus(http_port=0)
    assert ep.http_port and ep.http_port != ep.port
    with trio.fail_after(5):
        async with HttpClient(ep.http_port) as c:
            assert (await c.get("/healthz")).status == 200
            sent = (await c.post_json("/api/send", {"from": "a", "to": "b", "body": "via the HTTP port"})).json()
        async with HttpClient(ep.port) as c:
            assert [m["id"] for m in (await c.get("/api/inbox/b")).json()["messages"]] == [sent["id"]]


async def test_pipelined_requests_are_answered_and_committed_in_order(bus):
    sends = [
        http_request_bytes("POST", "/api/send", json.dumps({"from": "a", "to": "b", "body": str(i)}).encode())
        for i in range(20)
    ]
    with trio.fail_after(10):
        replies = parse_http_responses(await exchange_raw(bus.port, b"".join(sends)))
        assert [r.status for r in replies] == [200] * 20
        ids = [r.json()["id"] for r in replies]
        assert ids == sorted(set(ids))
        async with HttpClient(bus.port) as c:
            messages = (await c.get("/api/inbox/b")).json()["messages"]
        assert [(m["id"], m["body"]) for m in messages] == [(id_, str(i)) for i, id_ in enumerate(ids)]


async def test_keep_alive_serves_many_requests_on_one_connection(http):
    with trio.fail_after(5):
        stream = http.stream
        for i in range(5):
            assert (await http.post_json("/api/send", {"from": "a", "to": "b", "body": str(i)})).status == 200
            assert (await http.get("/api/inbox/nobody")).status == 200
        assert (await http.get("/nope")).status == 404
        assert (await http.get("/healthz")).status == 200
        assert http.stream is stream  # never reconnected
