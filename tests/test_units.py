"""Pure layers, no sockets: framing, token buckets, config, and the writer's
batch transaction on a real SQLite file."""

from __future__ import annotations

import re
import sqlite3

import pytest

from busd import db
from busd.config import ConfigError, Tokens, load
from busd.errors import BusError, Reason
from busd.framing import LineBuffer, LineTooLong
from busd.ratelimit import Buckets

# ---- framing ------------------------------------------------------------------


def test_linebuffer_splits_across_chunks():
    buf = LineBuffer(max_line=100)
    assert buf.feed(b'{"a":') == []
    assert buf.feed(b'1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert buf.pending == 4
    assert buf.feed(b":3}\n") == [b'{"c":3}']


def test_linebuffer_refuses_long_line_even_without_newline():
    buf = LineBuffer(max_line=10)
    buf.feed(b"x" * 10)
    with pytest.raises(LineTooLong):
        buf.feed(b"y")
    with pytest.raises(LineTooLong):
        LineBuffer(max_line=10).feed(b"z" * 11 + b"\n")


# ---- rate limits --------------------------------------------------------------


def test_bucket_holds_a_minute_then_refills_evenly():
    b = Buckets(per_minute=10)
    assert [b.take("a", 0.0) for _ in range(10)] == [0.0] * 10
    wait = b.take("a", 0.0)
    assert wait == pytest.approx(6.0)  # one token every 6 s
    assert b.take("other", 0.0) == 0.0  # buckets are per key
    assert b.take("a", 6.0) == 0.0
    assert b.take("a", 6.0) > 0


def test_bucket_zero_is_off():
    b = Buckets(per_minute=0)
    assert all(b.take("a", 0.0) == 0.0 for _ in range(1000))


# ---- config -------------------------------------------------------------------


def test_config_defaults_match_the_contract():
    c = load(None, {})
    assert (c.db, c.host, c.port, c.token) == ("busd.db", "127.0.0.1", 7700, None)
    assert (c.broadcast_per_minute, c.direct_per_minute, c.inbox_cap) == (10, 300, 10_000)
    assert (c.max_body, c.retention_days, c.synchronous) == (64 * 1024, 7.0, "FULL")


@pytest.mark.parametrize(
    "overrides, names",
    [
        ({"port": 70000}, "--port"),
        ({"inbox-cap": 0}, "--inbox-cap"),
        ({"agents": ["ok", "not ok"]}, "--agents"),
        ({"agents": ["all"]}, "--agents"),
        ({"host": "0.0.0.0"}, "--host"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_config_refuses_bad_values_naming_them(overrides, names):
    with pytest.raises(ConfigError, match=re.escape(names)):
        load(None, overrides)


def test_config_beyond_loopback_needs_token_or_insecure():
    assert load(None, {"host": "0.0.0.0", "token": "t"}).host == "0.0.0.0"
    assert load(None, {"host": "0.0.0.0", "insecure": True}).insecure


def test_deploy_sample_config_is_valid():
    c = load("deploy/busd.toml", {})
    assert c.port == 7700 and c.tokens_file == "/etc/busd/tokens"


def test_tokens_identify(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\ntok-a alice\ntok-admin *  # admin\n\n")
    from busd.config import read_tokens_file

    tokens = Tokens("shared", read_tokens_file(str(path)))
    assert tokens.required
    assert tokens.identify("tok-a") == "alice"
    assert tokens.identify("tok-admin") == "*"
    assert tokens.identify("shared") == "*"
    assert tokens.identify("tok-") is None and tokens.identify(None) is None
    assert not Tokens(None, {}).required


# ---- the writer ---------------------------------------------------------------


@pytest.fixture
def writer(tmp_path):
    conn = db.open_writer(str(tmp_path / "w.db"))
    yield db.Writer(conn, inbox_cap=2, strict=False)
    conn.close()


def send(sender, to, body="x", key=None):
    return db.Send(sender, to, "", body, None, key)


def test_batch_refusal_fails_alone(writer):
    out = writer.apply([send("a", "b"), send("a", "b"), send("a", "b"), send("a", "c")])
    assert [type(o).__name__ for o in out] == ["SendDone", "SendDone", "BusError", "SendDone"]
    assert out[2].reason is Reason.INBOX_FULL
    assert out[0].id < out[1].id < out[3].id  # ids in commit order; the refusal took none
    rows = writer.conn.execute("SELECT agent, message_id FROM inbox ORDER BY message_id").fetchall()
    assert rows == [("b", out[0].id), ("b", out[1].id), ("c", out[3].id)]


def test_duplicate_key_within_and_across_batches(writer):
    first, again = writer.apply([send("a", "b", key="k"), send("a", "b", body="other", key="k")])
    assert not first.duplicate and again.duplicate and (again.id, again.timestamp) == (first.id, first.timestamp)
    (later,) = writer.apply([send("a", "b", key="k")])
    assert later.duplicate and later.id == first.id
    (other_sender,) = writer.apply([send("z", "b", key="k")])
    assert not other_sender.duplicate and other_sender.id != first.id


def test_ack_frees_the_cap_and_counts_newly_read(writer):
    a, b = writer.apply([send("s", "r"), send("s", "r")])
    assert writer.apply([db.Ack("r", up_to=a.id)]) == [1]
    assert writer.apply([db.Ack("r", up_to=a.id)]) == [0]
    (c,) = writer.apply([send("s", "r")])
    assert isinstance(c, db.SendDone)
    assert writer.apply([db.Ack("r", ids=[b.id, c.id, 999])]) == [2]
    assert writer.conn.execute("SELECT unread FROM agents WHERE name = 'r'").fetchone() == (0,)


def test_broadcast_goes_to_known_agents_only(writer):
    writer.apply([db.Touch({"x": None, "y": "2026-01-01T00:00:00.000Z"}), send("s", "only-sent-to")])
    (done,) = writer.apply([send("s", "ALL")])
    assert done.recipients == 2
    agents = {r[0] for r in writer.conn.execute("SELECT agent FROM inbox WHERE message_id = ?", (done.id,))}
    assert agents == {"x", "y"}


def test_broadcast_refused_whole_when_one_inbox_is_full(writer):
    writer.apply([db.Touch({"x": None, "y": None}), send("s", "x"), send("s", "x")])
    (out,) = writer.apply([send("s", "ALL")])
    assert isinstance(out, BusError) and out.reason is Reason.INBOX_FULL
    assert writer.conn.execute("SELECT count(*) FROM messages WHERE recipient = 'ALL'").fetchone() == (0,)


def test_strict_mode_refuses_unknown(tmp_path):
    conn = db.open_writer(str(tmp_path / "s.db"))
    w = db.Writer(conn, inbox_cap=10, strict=True)
    (out,) = w.apply([send("a", "nobody")])
    assert isinstance(out, BusError) and out.reason is Reason.NOT_FOUND
    w.apply([db.Touch({"somebody": None})])
    (ok,) = w.apply([send("a", "somebody")])
    assert isinstance(ok, db.SendDone)


def test_failed_commit_fails_every_op_and_keeps_nothing(writer, tmp_path):
    (kept,) = writer.apply([send("a", "b")])
    other = sqlite3.connect(str(tmp_path / "w.db"), timeout=0)
    other.execute("BEGIN IMMEDIATE")  # hold the write lock: the writer's BEGIN fails
    writer.conn.execute("PRAGMA busy_timeout = 0")
    try:
        out = writer.apply([send("a", "b"), send("a", "c")])
    finally:
        other.rollback()
        other.close()
    assert all(isinstance(o, BusError) and o.reason is Reason.UNAVAILABLE for o in out)
    assert writer.conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    (after,) = writer.apply([send("a", "b")])
    assert after.id > kept.id


def test_purge_deletes_only_old_read_messages(writer):
    a, b, c = writer.apply([send("s", "r"), send("s", "r"), send("s", "ALL")])
    writer.apply([db.Ack("r", up_to=a.id)])
    writer.conn.execute("UPDATE inbox SET read_at = '2000-01-01T00:00:00.000Z' WHERE read_at IS NOT NULL")
    assert writer.apply([db.Purge(cutoff="2001-01-01T00:00:00.000Z")]) == [1]
    ids = [r[0] for r in writer.conn.execute("SELECT id FROM messages ORDER BY id")]
    assert ids == [b.id, c.id]


def test_schema_version_newer_is_refused(tmp_path):
    path = str(tmp_path / "new.db")
    db.open_writer(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(db.UnusableDatabase, match="newer"):
        db.open_writer(path)


def test_timestamp_format():
    assert db.timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert db.timestamp(1.2345) == "1970-01-01T00:00:01.234Z"


def test_timestamp_agrees_with_datetime():
    """The cached-per-second formatter rounds exactly as datetime does."""
    import datetime as dt
    import random

    rng = random.Random(5)
    values = [0.0, 0.9995, 0.9999999, 59.9996, 1764201600.123, 1764201600.9995, 4102444799.9999]
    values += [rng.uniform(0, 4e9) for _ in range(20_000)]
    values += [1764201600 + rng.randrange(0, 10**7) / 1000 for _ in range(20_000)]
    for t in values:
        d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
        assert db.timestamp(t) == d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z", t
