"""Sending, and the message as every read returns it: names, shape, ids,
timestamps, subject and body, unknown recipients, strict mode, idempotent
sends. Each test runs over JSON lines and over HTTP (the ``api`` and
``connect`` fixtures)."""

from __future__ import annotations

import datetime as dt
import re

import trio

from .wireclients import http_transport, jsonl_transport, refusal

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
SEND_RESULT_KEYS = {"id", "timestamp", "recipients"}

GOOD_NAMES = ["a", "Z", "9lives", "coder.v2", "x_y-z", "a" * 64, "ALLy", "all-hands", "Alloy", "xALL"]
BAD_NAMES = ["", "a b", "-a", ".a", "_a", "a" * 65, "é", "a/b", "a:b", "a\tb", "ALL", "all", "All", "aLl"]


async def test_every_valid_name_can_send_and_read(api):
    with trio.fail_after(10):
        for name in GOOD_NAMES:
            r = await api.send(from_=name, to=name, body=f"to myself, {name}")
            msgs = await api.inbox(name)
            assert [(m["id"], m["from"], m["to"]) for m in msgs] == [(r["id"], name, name)], name


async def test_bad_names_and_any_case_of_all_are_refused(api):
    with trio.fail_after(10):
        for name in BAD_NAMES:
            await refusal(api.send(from_=name, to="b", body="x"), "bad_request")
            if name != "ALL":  # "ALL" in capitals is the broadcast address
                await refusal(api.send(from_="a", to=name, body="x"), "bad_request")
            if name:  # an empty name is no path segment at all over HTTP
                await refusal(api.inbox(name), "bad_request")
        assert await api.inbox("b") == []  # nothing was stored on the way


async def test_name_with_trailing_newline_is_refused(api):
    with trio.fail_after(5):
        await refusal(api.send(from_="a\n", to="b", body="x"), "bad_request")
        await refusal(api.send(from_="a", to="b\n", body="x"), "bad_request")
        await refusal(api.inbox("b\n"), "bad_request")


async def test_message_has_exactly_the_contract_fields(api):
    with trio.fail_after(5):
        r = await api.send(from_="manager", to="coder", subject="Build login", body="...")
        assert set(r) == SEND_RESULT_KEYS and r["recipients"] == 1
        assert isinstance(r["id"], int) and r["id"] >= 1
        [m] = await api.inbox("coder")
        assert m == {
            "id": r["id"],
            "from": "manager",
            "to": "coder",
            "subject": "Build login",
            "body": "...",
            "timestamp": r["timestamp"],
        }


async def test_reply_to_appears_only_when_given(api):
    with trio.fail_after(5):
        first = await api.send(from_="a", to="b", body="question")
        second = await api.send(from_="b", to="a", body="answer", reply_to=first["id"])
        [q] = await api.inbox("b")
        [a] = await api.inbox("a")
        assert "reply_to" not in q
        assert a["reply_to"] == first["id"] and a["id"] == second["id"]
        await refusal(api.send(from_="b", to="a", body="x", reply_to="one"), "bad_request")


async def test_subject_defaults_to_empty_string(api):
    with trio.fail_after(5):
        await api.send(from_="a", to="b", body="no subject")
        [m] = await api.inbox("b")
        assert m["subject"] == ""


async def test_timestamp_is_utc_iso8601_with_milliseconds(api):
    with trio.fail_after(5):
        before = dt.datetime.now(dt.timezone.utc)
        r = await api.send(from_="a", to="b", body="x")
        after = dt.datetime.now(dt.timezone.utc)
        assert TIMESTAMP.fullmatch(r["timestamp"]), r["timestamp"]
        at = dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))
        slack = dt.timedelta(seconds=1)
        assert before - slack <= at <= after + slack
        [m] = await api.inbox("b")
        assert m["timestamp"] == r["timestamp"]


async def test_ids_strictly_increase_in_commit_order_across_the_bus(api, bus):
    """Each send is answered before the next is written, so commit order is
    the order of this loop, whichever connection or inbox it uses."""
    with trio.fail_after(10):
        async with jsonl_transport(bus.port) as other:
            ids, stamps = [], []
            for i in range(12):
                client = (api, other)[i % 2]
                r = await client.send(from_=f"s{i % 3}", to=f"r{i % 4}", body=str(i))
                ids.append(r["id"])
                stamps.append(r["timestamp"])
            assert ids == sorted(set(ids)), ids
            assert stamps == sorted(stamps), stamps
            for r in range(4):
                got = [m["id"] for m in await api.inbox(f"r{r}")]
                assert got == ids[r::4], (r, got)


async def test_subject_at_most_256_characters(api):
    with trio.fail_after(5):
        for subject in ("s" * 256, "é" * 256, "😀" * 256):  # characters, not bytes
            await api.send(from_="a", to="b", subject=subject, body="x")
        assert [m["subject"] for m in await api.inbox("b")] == ["s" * 256, "é" * 256, "😀" * 256]
        await refusal(api.send(from_="a", to="b", subject="s" * 257, body="x"), "bad_request")
        await refusal(api.send(from_="a", to="b", subject=7, body="x"), "bad_request")
        assert len(await api.inbox("b")) == 3


async def test_body_is_required_and_a_string(api):
    with trio.fail_after(5):
        await refusal(api.send(from_="a", to="b"), "bad_request")
        for body in (None, 5, ["x"], {"text": "x"}, True):
            await refusal(api.send(from_="a", to="b", body=body), "bad_request")
        assert await api.inbox("b") == []
        await api.send(from_="a", to="b", body="")  # empty is a string
        assert [m["body"] for m in await api.inbox("b")] == [""]


async def test_body_round_trips_exactly(api):
    bodies = ['{"id": 1}\n', "tab\there\r\nnul\x00end", 'quote " backslash \\ slash /', "ünïcödé 😀 漢字"]
    with trio.fail_after(5):
        for body in bodies:
            await api.send(from_="a", to="b", body=body)
        assert [m["body"] for m in await api.inbox("b")] == bodies


async def test_default_body_limit_is_64_kib_of_utf8(api):
    with trio.fail_after(10):
        await api.send(from_="a", to="b", body="x" * 65536)
        await api.send(from_="a", to="b", body="é" * 32768)  # 65536 bytes
        await refusal(api.send(from_="a", to="b", body="x" * 65537), "too_large")
        await refusal(api.send(from_="a", to="b", body="é" * 32769), "too_large")  # 32769 chars, 65538 bytes
        assert [len(m["body"]) for m in await api.inbox("b")] == [65536, 32768]


async def test_unknown_recipient_is_accepted_and_waits(api):
    with trio.fail_after(5):
        r = await api.send(from_="a", to="newcomer", body="welcome")
        assert r["recipients"] == 1
        assert [m["id"] for m in await api.inbox("newcomer")] == [r["id"]]


async def test_strict_mode_refuses_unknown_recipients(start_bus, connect):
    ep = await start_bus(strict=True, agents=["configured"])
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            await t.send(from_="a", to="configured", body="ok")
            await refusal(t.send(from_="a", to="stranger", body="no"), "not_found")
            await t.inbox("reader")  # reading makes a name known
            await t.send(from_="b", to="reader", body="ok")
            await t.send(from_="stranger2", to="a", body="senders become known")
            await t.send(from_="b", to="stranger2", body="ok")
            assert await t.inbox("stranger") == []


async def test_send_with_key_is_stored_once(api):
    with trio.fail_after(5):
        first = await api.send(from_="a", to="b", body="original", key="k-1")
        assert set(first) == SEND_RESULT_KEYS
        again = await api.send(from_="a", to="b", body="changed", key="k-1")
        assert again["duplicate"] is True
        assert (again["id"], again["timestamp"]) == (first["id"], first["timestamp"])
        assert [m["body"] for m in await api.inbox("b")] == ["original"]


async def test_same_key_from_another_sender_is_another_message(api):
    with trio.fail_after(5):
        first = await api.send(from_="a", to="b", body="from a", key="shared")
        other = await api.send(from_="c", to="b", body="from c", key="shared")
        assert other["id"] > first["id"] and not other.get("duplicate")
        assert [m["body"] for m in await api.inbox("b")] == ["from a", "from c"]


async def test_key_is_1_to_128_characters(api):
    with trio.fail_after(5):
        await api.send(from_="a", to="b", body="x", key="k")
        await api.send(from_="a", to="b", body="x", key="é" * 128)
        await refusal(api.send(from_="a", to="b", body="x", key=""), "bad_request")
        await refusal(api.send(from_="a", to="b", body="x", key="k" * 129), "bad_request")
        await refusal(api.send(from_="a", to="b", body="x", key=12), "bad_request")
        assert len(await api.inbox("b")) == 2


async def test_key_is_remembered_after_the_message_is_read(api):
    with trio.fail_after(5):
        first = await api.send(from_="a", to="b", body="once", key="k")
        await api.ack("b", first["id"])
        again = await api.send(from_="a", to="b", body="once", key="k")
        assert again["duplicate"] is True and again["id"] == first["id"]
        assert await api.inbox("b") == []


async def test_concurrent_senders_keep_their_own_order(bus):
    """Six clients (both transports) send at once to one inbox: nothing
    acknowledged is missing, ids are unique, and each sender's messages
    arrive in the order the bus acknowledged them."""
    acked: dict[str, list[int]] = {}

    async def sender(factory, name):
        async with factory(bus.port) as t:
            acked[name] = [(await t.send(from_=name, to="hub", body=f"{name} {i}"))["id"] for i in range(15)]

    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(sender, (jsonl_transport, http_transport)[i % 2], f"s{i}")
        async with jsonl_transport(bus.port) as t:
            inbox = await t.inbox("hub", limit=1000)
        assert [m["id"] for m in inbox] == sorted(i for ids in acked.values() for i in ids)
        for name, ids in acked.items():
            assert [m["id"] for m in inbox if m["from"] == name] == ids
            assert [m["body"] for m in inbox if m["from"] == name] == [f"{name} {i}" for i in range(15)]
