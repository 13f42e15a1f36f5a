from .wireclients import Refused


async def test_send_then_inbox(api):
    r = await api.send(from_="a", to="b", body="hi", subject="s")
    assert r["id"] >= 1 and r["recipients"] == 1 and r["timestamp"].endswith("Z")
    msgs = await api.inbox("b")
    assert [m["body"] for m in msgs] == ["hi"]
    assert msgs[0] == {"id": r["id"], "from": "a", "to": "b", "subject": "s", "body": "hi", "timestamp": r["timestamp"]}


async def test_bad_name_refused(api):
    try:
        await api.send(from_="a b", to="b", body="x")
    except Refused as e:
        assert e.reason == "bad_request"
    else:
        raise AssertionError("accepted a bad name")
