"""protocol.md and the README's examples, run against a real daemon, so the
documents cannot drift from the code.

How the documents are read (protocol.md, "About the examples", says the same
for its readers):

* Every heading starts a new *section*. Each section's examples run, in order,
  against one fresh daemon (the ``start_bus`` fixture: loopback, a free port,
  a new SQLite file), so message ids are deterministic. A section whose first
  example line is ``$ busd serve OPTIONS`` gets a daemon started with those
  options (parsed by busd's own argument parser).
* A ```console block holds commands, each starting with ``$ `` (a trailing
  ``\\`` continues it on the next line), each followed by its expected output:
  - ``$ curl ...`` is parsed (-s, -i, -X, -H, -d) and sent with the test's own
    HTTP client, so the curl binary is not needed. With ``-i`` the output is a
    status line, the headers worth showing (a subset: each one shown must be
    in the reply), a blank line and the body; without it, just the body.
  - ``$ nc localhost 7700`` starts a JSON-lines session: every following line
    is a request the reader types, or a reply, until the block ends. A line
    that is a JSON object with ``"jsonrpc"`` and ``"result"`` or ``"error"`` is
    a reply; any other line is sent verbatim. Consecutive request lines are
    sent in one write (as a paste would); the replies shown after them are
    read and matched by ``id`` (replies may come back out of order). Every
    request must show exactly one reply, and after the session the test half-
    closes the connection and checks that nothing else comes back.
  - ``$ busd serve ...`` starts the section's daemon (no output).
* A ```python block is run as a program with ``python -I -S`` (standard
  library only) after ``7700`` is replaced by the daemon's port; it must exit
  with 0. A ```text block right after it is its exact expected stdout.
* ```text after ``<!-- file: NAME -->`` is written to NAME in the section's
  folder (for ``--tokens-file NAME``). ```json blocks must parse.
* ``<!-- xfail: REASON -->`` above the last example block of a section marks
  a documented behaviour that busd gets wrong today: that block must fail
  (the test is reported as xfail) and the test fails once it passes, so the
  marker is removed when the code is fixed.
* Tables after ``<!-- fields: busd.wire.X -->``, ``<!-- table: errors -->``,
  ``<!-- table: jsonrpc-codes -->`` and ``<!-- table: serve-options -->`` are
  checked against the Structs, the error tables and the defaults.

Expected JSON is compared structurally. What varies from run to run is
matched by shape only: a string shaped like a bus timestamp matches any
timestamp (the same documented timestamp must always stand for the same
actual one within a section), and the values of ``uptime_s``, ``db``,
``version``, ``retry_after`` and ``writer`` need only have the documented
JSON types. A documented string ending in "…" matches any string with that
prefix. Everything else, ids included, must be equal.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import trio

from busd import cli, config, http, jsonl, wire
from busd.errors import Reason

from .wireclients import HttpClient

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "protocol.md", ROOT / "README.md"]
DOC_PORT = "7700"

SECTION_TIMEOUT = 15.0  # seconds for all the examples of one section
PROGRAM_TIMEOUT = 10.0  # seconds for one Python example

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SHAPE_ONLY = frozenset({"uptime_s", "db", "version", "retry_after", "writer"})
ELLIPSIS = "…"


# ---- reading the documents ---------------------------------------------------


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    directive: str | None  # the <!-- ... --> right above it, if any

    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass
class Table:
    path: Path
    line: int
    directive: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    path: Path
    line: int
    heading: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Doc:
    sections: list[Section]
    tables: list[Table]


DIRECTIVE = re.compile(r"^<!--\s*(.*?)\s*-->$")


def read_doc(path: Path) -> Doc:
    lines = path.read_text(encoding="utf-8").splitlines()
    sections = [Section(path, 1, "(top)")]
    tables: list[Table] = []
    directive: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip()
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"{path.name}:{start + 1}: unclosed code block"
            sections[-1].blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", directive))
            directive = None
        elif line.startswith("#"):
            sections.append(Section(path, i + 1, line.lstrip("#").strip()))
            directive = None
        elif m := DIRECTIVE.match(line.strip()):
            directive = m.group(1)
        elif line.startswith("|") and directive is not None:
            start = i
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append(Table(path, start + 1, directive, rows[0], rows[2:]))
            directive = None
            continue
        # other lines are prose: a directive stays in force until its block or table
        i += 1
    return Doc(sections, tables)


DOCUMENTS = {path.name: read_doc(path) for path in DOCS}


def example_sections() -> list[Any]:
    out = []
    for name, doc in DOCUMENTS.items():
        for s in doc.sections:
            if any(b.lang in ("console", "python") for b in s.blocks):
                out.append(pytest.param(s, id=f"{name}:{s.line} {s.heading.replace('`', '')}"))
    return out


def tables(directive: str) -> list[Table]:
    return [t for doc in DOCUMENTS.values() for t in doc.tables if t.directive == directive]


# ---- comparing ---------------------------------------------------------------


class Mismatch(AssertionError):
    pass


@dataclass
class Context:
    timestamps: dict[str, str] = field(default_factory=dict)


def same_json_type(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return isinstance(a, float) == isinstance(b, float)
    return type(a) is type(b)


def match(expected: Any, actual: Any, ctx: Context, path: str = "$") -> None:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            raise Mismatch(f"{path}: expected an object, got {actual!r}")
        if set(expected) != set(actual):
            raise Mismatch(f"{path}: members {sorted(actual)} instead of {sorted(expected)}")
        for key, value in expected.items():
            if key in SHAPE_ONLY:
                match_shape(value, actual[key], f"{path}.{key}")
                if key == "retry_after" and not actual[key] > 0:
                    raise Mismatch(f"{path}.{key}: {actual[key]!r} is not > 0")
            else:
                match(value, actual[key], ctx, f"{path}.{key}")
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            raise Mismatch(f"{path}: expected {len(expected)} items, got {actual!r}")
        for n, (e, a) in enumerate(zip(expected, actual)):
            match(e, a, ctx, f"{path}[{n}]")
    elif isinstance(expected, str) and TIMESTAMP.fullmatch(expected):
        if not isinstance(actual, str) or not TIMESTAMP.fullmatch(actual):
            raise Mismatch(f"{path}: expected a timestamp, got {actual!r}")
        seen = ctx.timestamps.setdefault(expected, actual)
        if seen != actual:
            raise Mismatch(f"{path}: {expected} stood for {seen} before, now for {actual}")
    elif isinstance(expected, str) and expected.endswith(ELLIPSIS):
        if not isinstance(actual, str) or not actual.startswith(expected[: -len(ELLIPSIS)]):
            raise Mismatch(f"{path}: expected a string starting {expected[:-1]!r}, got {actual!r}")
    elif not same_json_type(expected, actual) or expected != actual:
        raise Mismatch(f"{path}: expected {expected!r}, got {actual!r}")


def match_shape(expected: Any, actual: Any, path: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            raise Mismatch(f"{path}: expected members {sorted(expected)}, got {actual!r}")
        for key in expected:
            match_shape(expected[key], actual[key], f"{path}.{key}")
    elif not same_json_type(expected, actual):
        raise Mismatch(f"{path}: expected a value like {expected!r}, got {actual!r}")


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{where}: documented output is not JSON ({e}): {text!r}") from None


# ---- running a section ---------------------------------------------------------


@dataclass
class Command:
    line: int
    text: str  # without "$ ", continuations joined
    output: list[str]


def commands(block: Block) -> list[Command]:
    out: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            raise AssertionError(f"{block.where()}+{i + 1}: output without a command: {line!r}")
        start = i
        text = line[2:]
        while text.endswith("\\"):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        out.append(Command(block.line + 1 + start, text.strip(), output))
    return out


class Runner:
    def __init__(self, section: Section, start_bus: Any, folder: Path) -> None:
        self.section = section
        self.start_bus = start_bus
        self.folder = folder
        self.port: int | None = None
        self.ctx = Context()
        self.ran = 0  # examples run; a daemon may be configured only before the first
        self.xfail: str | None = None  # the reason, once an xfail block has failed

    async def ensure_daemon(self, **settings: Any) -> int:
        if self.port is None:
            settings.setdefault("db", str(self.folder / "busd.db"))
            endpoints = await self.start_bus(**settings)
            self.port = endpoints.port
        return self.port

    async def run(self) -> None:
        blocks = self.section.blocks
        for n, block in enumerate(blocks):
            if block.directive and block.directive.startswith("xfail:"):
                later = [b for b in blocks[n + 1 :] if b.lang in ("console", "python")]
                assert not later, f"{block.where()}: an xfail block must be the section's last example"
                try:
                    for cmd in commands(block):
                        await self.command(cmd, block)
                except AssertionError:
                    self.xfail = block.directive.split(":", 1)[1].strip()
                    return
                pytest.fail(f"{block.where()}: passes now; remove its <!-- xfail --> marker")
            if block.lang == "console":
                for cmd in commands(block):
                    await self.command(cmd, block)
            elif block.lang == "python":
                following = blocks[n + 1] if n + 1 < len(blocks) else None
                is_output = following is not None and following.lang == "text" and not following.directive
                expected = following.text if is_output else None
                await self.program(block, expected)
            elif block.lang == "text" and block.directive and block.directive.startswith("file:"):
                name = block.directive.split(":", 1)[1].strip()
                (self.folder / name).write_text(block.text, encoding="utf-8")

    async def command(self, cmd: Command, block: Block) -> None:
        where = f"{block.path.name}:{cmd.line}"
        argv = shlex.split(cmd.text)
        if argv[:2] == ["busd", "serve"]:
            assert not cmd.output, f"{where}: busd serve shows no output here"
            assert self.port is None and not self.ran, f"{where}: busd serve must come before the section's examples"
            await self.ensure_daemon(**self.serve_settings(argv[2:], where))
            return
        self.ran += 1
        if argv[0] == "curl":
            await self.curl(argv[1:], cmd.output, where)
        elif argv[0] == "nc":
            assert argv[1:] == ["localhost", DOC_PORT], f"{where}: sessions are 'nc localhost {DOC_PORT}'"
            await self.netcat(cmd.output, where)
        else:
            raise AssertionError(f"{where}: no way to run {argv[0]!r} in an example")

    def serve_settings(self, args: list[str], where: str) -> dict[str, Any]:
        ns = cli.parser().parse_args(["serve", *args])
        settings = {k: getattr(ns, k) for k in cli.SERVE_OPTIONS if getattr(ns, k) is not None}
        assert ns.config is None, f"{where}: --config is not supported in examples"
        for key in ("db", "port", "host"):
            assert key not in settings, f"{where}: examples run on the test's own --{key}"
        if "agents" in settings:
            settings["agents"] = [a.strip() for a in settings["agents"].split(",") if a.strip()]
        if "tokens_file" in settings:
            settings["tokens_file"] = str(self.folder / settings["tokens_file"])
        return settings

    # -- curl -------------------------------------------------------------------

    async def curl(self, args: list[str], output: list[str], where: str) -> None:
        method, url, headers, data, include = None, None, {}, None, False
        args = list(args)
        while args:
            a = args.pop(0)
            if a in ("-X", "--request"):
                method = args.pop(0)
            elif a in ("-H", "--header"):
                name, _, value = args.pop(0).partition(":")
                headers[name.strip()] = value.strip()
            elif a in ("-d", "--data", "--data-raw", "--data-binary"):
                data = args.pop(0).encode()
            elif a == "--include":
                include = True
            elif a == "--silent":
                pass
            elif re.fullmatch(r"-[siS]+", a):
                include = include or "i" in a
            elif a.startswith("-"):
                raise AssertionError(f"{where}: curl option {a} is not understood by the doc test")
            else:
                assert url is None, f"{where}: two URLs"
                url = a
        assert url is not None, f"{where}: no URL"
        parts = urlsplit(url if "://" in url else "http://" + url)
        assert parts.hostname == "localhost" and str(parts.port) == DOC_PORT, f"{where}: use localhost:{DOC_PORT}"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        method = method or ("POST" if data is not None else "GET")
        port = await self.ensure_daemon()
        async with HttpClient(port) as client:
            resp = await client.request(method, target, body=data, headers=headers)
        body_lines = output
        if include:
            status_line, *rest = output
            m = re.match(r"HTTP/1\.1 (\d{3})\b", status_line)
            assert m, f"{where}: bad documented status line {status_line!r}"
            if resp.status != int(m.group(1)):
                raise Mismatch(f"{where}: status {resp.status}, documented {m.group(1)}: {resp.body!r}")
            blank = rest.index("")
            for header in rest[:blank]:
                name, _, value = header.partition(":")
                name, value = name.strip().lower(), value.strip()
                got = resp.headers.get(name)
                if name == "retry-after":
                    ok = got is not None and got.isdigit() and value.isdigit() and 1 <= int(got) <= int(value)
                else:
                    ok = got == value
                if not ok:
                    raise Mismatch(f"{where}: header {name}: {got!r}, documented {value!r}")
            body_lines = rest[blank + 1 :]
        expected = parse_json("\n".join(body_lines), where)
        try:
            match(expected, resp.json(), self.ctx)
        except Mismatch as e:
            raise Mismatch(f"{where}: {e}\n  got: {resp.body.decode()}") from None

    # -- netcat ----------------------------------------------------------------

    async def netcat(self, transcript: list[str], where: str) -> None:
        steps: list[tuple[list[str], list[Any]]] = []  # (requests sent together, replies then read)
        for line in transcript:
            reply = _as_reply(line)
            if reply is None:
                if not steps or steps[-1][1]:
                    steps.append(([], []))
                steps[-1][0].append(line)
            else:
                assert steps, f"{where}: a reply before any request"
                steps[-1][1].append(reply)
        sent = sum(1 for reqs, _ in steps for r in reqs if r.strip())
        shown = sum(len(reps) for _, reps in steps)
        assert sent == shown, f"{where}: {sent} requests but {shown} replies shown"
        port = await self.ensure_daemon()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        reader = _Lines(stream)
        async with stream:
            for requests, replies in steps:
                await stream.send_all("".join(r + "\n" for r in requests).encode())
                got = [await reader.next(where) for _ in replies]
                self._match_replies(replies, got, where)
            await stream.send_eof()
            extra = await reader.rest()
            if extra:
                raise Mismatch(f"{where}: replies the document does not show: {extra}")

    def _match_replies(self, expected: list[Any], got: list[Any], where: str) -> None:
        pool = list(got)
        for exp in expected:
            rid = exp.get("id")
            found = next((g for g in pool if type(g.get("id")) is type(rid) and g.get("id") == rid), None)
            if found is None:
                raise Mismatch(f"{where}: no reply with id {exp.get('id')!r}; got {got}")
            pool.remove(found)
            try:
                match(exp, found, self.ctx)
            except Mismatch as e:
                raise Mismatch(f"{where}: reply {exp.get('id')!r}: {e}\n  got: {json.dumps(found)}") from None

    # -- python ----------------------------------------------------------------

    async def program(self, block: Block, expected: str | None) -> None:
        self.ran += 1
        port = await self.ensure_daemon()
        source = block.text.replace(DOC_PORT, str(port))
        script = self.folder / f"example_{block.line}.py"
        script.write_text(source, encoding="utf-8")
        with trio.fail_after(PROGRAM_TIMEOUT):
            done = await trio.run_process(
                [sys.executable, "-I", "-S", str(script)], capture_stdout=True, capture_stderr=True, check=False
            )
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == 0, f"{block.where()}: exit {done.returncode}\n{err}"
        if expected is not None and out != expected:
            raise Mismatch(f"{block.where()}: printed\n{out}\ndocumented\n{expected}")


def _as_reply(line: str) -> Any:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and "jsonrpc" in obj and ("result" in obj or "error" in obj):
        return obj
    return None


class _Lines:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self, where: str) -> Any:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise Mismatch(f"{where}: the connection closed while a reply was due")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def rest(self) -> list[Any]:
        while chunk := await self.stream.receive_some(65536):
            self.buf += chunk
        return [json.loads(line) for line in self.buf.splitlines() if line.strip()]


# ---- the tests -------------------------------------------------------------------


@pytest.mark.parametrize("section", example_sections())
async def test_examples(section: Section, start_bus: Any, tmp_path: Path) -> None:
    runner = Runner(section, start_bus, tmp_path)
    with trio.fail_after(SECTION_TIMEOUT):
        await runner.run()
    if runner.xfail is not None:
        pytest.xfail(runner.xfail)


def test_documents_have_examples() -> None:
    """The runner cannot pass by finding nothing."""
    protocol = DOCUMENTS["protocol.md"]
    blocks = [b for s in protocol.sections for b in s.blocks]
    texts = [b.text for b in blocks if b.lang == "console"]
    assert sum(t.count("$ curl ") for t in texts) >= 15
    assert sum(t.count("$ nc localhost 7700") for t in texts) >= 12
    assert sum(b.lang == "python" for b in blocks) >= 2
    readme = [b.text for s in DOCUMENTS["README.md"].sections for b in s.blocks if b.lang == "console"]
    assert any("$ curl " in t for t in readme) and any("$ nc localhost 7700" in t for t in readme)


def test_json_blocks_parse() -> None:
    for doc in DOCUMENTS.values():
        for s in doc.sections:
            for b in s.blocks:
                if b.lang == "json":
                    parse_json(b.text, b.where())


def test_message_example_decodes() -> None:
    """The documented message object is a valid wire.Message."""
    blocks = [b for s in DOCUMENTS["protocol.md"].sections for b in s.blocks if b.directive == "message"]
    assert blocks, "no <!-- message --> block"
    for b in blocks:
        msg = msgspec.json.decode(b.text.encode(), type=wire.Message)
        assert TIMESTAMP.fullmatch(msg.timestamp)


def _cell(text: str) -> str:
    return text.strip().strip("`")


FIELD_TABLES = [t for doc in DOCUMENTS.values() for t in doc.tables if t.directive.startswith("fields:")]


@pytest.mark.parametrize("table", FIELD_TABLES, ids=[t.directive.split(".")[-1] for t in FIELD_TABLES])
def test_field_tables(table: Table) -> None:
    """A documented Struct lists exactly its wire fields, with their defaults."""
    name = table.directive.split(":", 1)[1].strip().removeprefix("busd.wire.")
    struct = getattr(wire, name)
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    documented = {_cell(row[0]): row for row in table.rows}
    where = f"{table.path.name}:{table.line}"
    assert set(documented) == set(fields), f"{where}: documents {sorted(documented)}, {name} has {sorted(fields)}"
    if "default" in table.header:
        col = table.header.index("default")
        for key, row in documented.items():
            f, cell = fields[key], row[col]
            if cell == "required":
                assert f.required, f"{where}: {key} is not required"
            elif cell == "—":
                assert not f.required and f.default is None, f"{where}: {key} defaults to {f.default!r}"
            else:
                documented_default = json.loads(_cell(cell))
                assert not f.required and documented_default == f.default, f"{where}: {key} defaults to {f.default!r}"


def test_error_table() -> None:
    """Reason, HTTP status and JSON-RPC code: exactly http.HTTP_STATUS and jsonl.CODES."""
    (table,) = tables("table: errors")
    documented = {_cell(r[0]): (int(r[1]), int(r[2])) for r in table.rows}
    actual = {reason.value: (http.HTTP_STATUS[reason], jsonl.CODES[reason]) for reason in Reason}
    assert documented == actual


def test_jsonrpc_code_table() -> None:
    (table,) = tables("table: jsonrpc-codes")
    documented = {int(_cell(r[0])) for r in table.rows}
    assert documented == {
        jsonl.PARSE_ERROR,
        jsonl.INVALID_REQUEST,
        jsonl.METHOD_NOT_FOUND,
        jsonl.INVALID_PARAMS,
    }


def test_serve_options_table() -> None:
    """Every `busd serve` option is listed, with Config's default."""
    (table,) = tables("table: serve-options")
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    options = {a.option_strings[0] for a in serve._actions if a.option_strings and a.option_strings[0] != "-h"}
    documented = {}
    for row in table.rows:
        option = _cell(row[0]).split()[0]
        documented[option] = _cell(row[1])
    assert set(documented) == options
    defaults = {f.encode_name: f.default for f in msgspec.structs.fields(config.Config)}
    for option, cell in documented.items():
        key = option[2:]
        if key not in defaults:
            assert cell == "—", f"{option}: not a setting, so no default"
            continue
        default = defaults[key]
        if default is None or default == ():
            assert cell == "—", f"{option} has no default, documented {cell!r}"
        elif isinstance(default, bool):
            assert cell == ("on" if default else "off"), f"{option} defaults to {default}"
        elif isinstance(default, str):
            assert cell == default, f"{option} defaults to {default!r}, documented {cell!r}"
        else:
            assert float(cell.replace(",", "")) == default, f"{option} defaults to {default!r}, documented {cell!r}"


def test_comparison_can_fail() -> None:
    """The placeholders are not wildcards."""
    ctx = Context()
    match({"timestamp": "2026-11-24T06:16:01.123Z"}, {"timestamp": "2026-01-01T00:00:00.000Z"}, ctx)
    bad = [
        ({"timestamp": "2026-11-24T06:16:01.123Z"}, {"timestamp": "2026-01-01T00:00:00.001Z"}),  # same placeholder
        ({"timestamp": "2026-11-24T06:16:09.000Z"}, {"timestamp": "yesterday"}),
        ({"id": 1}, {"id": 2}),
        ({"id": 1}, {"id": 1, "duplicate": True}),
        ({"ok": True}, {"ok": 1}),
        ({"message": "inbox of…"}, {"message": "rate limited"}),
        ({"retry_after": 30.0}, {"retry_after": 0}),
        ({"writer": {"queued": 0}}, {"writer": {"queued": 0, "ops": 1}}),
    ]
    for expected, actual in bad:
        with pytest.raises(Mismatch):
            match(expected, actual, ctx)
