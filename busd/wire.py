"""Every message on the wire, as msgspec Structs: the single definition of the
protocol. Decoders and the encoder are built once here and reused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType, field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"  # the contract's, with \Z: no trailing newline
BROADCAST = "ALL"

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
ID_MAX = 2**63 - 1  # SQLite's integers are 64-bit
MessageId = Annotated[int, Meta(ge=1, le=ID_MAX)]
AckId = Annotated[int, Meta(ge=0, le=ID_MAX)]
Subject = Annotated[str, Meta(max_length=256)]
Key = Annotated[str, Meta(min_length=1, max_length=128)]


# ---- the message, as every read returns it ----------------------------------


class Message(Struct, omit_defaults=True):
    id: int
    from_: str = field(name="from")
    to: str
    subject: str
    body: str
    timestamp: str
    reply_to: int | UnsetType = UNSET


# ---- request params (JSON-RPC params, HTTP bodies and query strings) --------


class SendParams(Struct, kw_only=True):
    from_: Name = field(name="from")
    to: Name
    body: str
    subject: Subject = ""
    key: Key | None = None
    reply_to: MessageId | None = None


class InboxParams(Struct, kw_only=True):
    agent: Name
    ack: AckId = 0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    wait: Annotated[float, Meta(ge=0, le=60)] = 0.0
    after: AckId = 0  # only messages with a larger id (for followers that don't ack)


class AckParams(Struct, kw_only=True):
    agent: Name
    up_to: AckId | None = None
    ids: Annotated[list[MessageId], Meta(max_length=10_000)] | None = None


class AuthParams(Struct, kw_only=True):
    token: str


class NoParams(Struct):
    pass


# ---- results ----------------------------------------------------------------


class SendResult(Struct, omit_defaults=True):
    id: int
    timestamp: str
    recipients: int
    duplicate: bool | UnsetType = UNSET


class InboxResult(Struct):
    agent: str
    messages: list[Message]


class AckResult(Struct):
    acked: int


class AgentInfo(Struct):
    name: str
    last_seen: str | None
    unread: int


class AgentsResult(Struct):
    agents: list[AgentInfo]


class OkResult(Struct):
    ok: bool = True


class PingResult(Struct):
    pong: bool
    time: str


class WriterStats(Struct):
    queued: int
    batches: int
    ops: int
    max_batch: int
    mean_batch: float
    commit_ms_last: float
    commit_ms_mean: float


class StatsResult(Struct):
    version: str
    uptime_s: float
    db: str
    connections_open: int
    connections_total: int
    requests: int
    agents: int
    unread: int
    last_id: int
    waiters: int
    writer: WriterStats


# ---- JSON-RPC 2.0 envelope --------------------------------------------------

RequestId = int | str | None


class Request(Struct):
    method: str
    id: RequestId = None
    params: Raw = Raw(b"")
    jsonrpc: Literal["2.0"] = "2.0"


class Response(Struct):
    jsonrpc: str
    id: RequestId
    result: Any


class ErrorObject(Struct):
    code: int
    message: str
    data: dict[str, Any]


class ErrorResponse(Struct):
    jsonrpc: str
    id: RequestId
    error: ErrorObject


# ---- HTTP bodies ------------------------------------------------------------


class HttpError(Struct, omit_defaults=True):
    code: str
    message: str
    retry_after: float | UnsetType = UNSET


class HttpErrorReply(Struct):
    ok: bool
    error: HttpError


# ---- codecs, built once -----------------------------------------------------

encoder = msgspec.json.Encoder()
# What decoding bad bytes can raise: msgspec lets invalid UTF-8 through as
# UnicodeDecodeError and nesting deeper than Python's stack as RecursionError.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
request_decoder = msgspec.json.Decoder(Request)
any_decoder = msgspec.json.Decoder()

PARAMS: dict[str, type[Struct]] = {
    "auth": AuthParams,
    "send": SendParams,
    "inbox": InboxParams,
    "ack": AckParams,
    "agents": NoParams,
    "stats": NoParams,
    "ping": NoParams,
}
PARAMS_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    method: msgspec.json.Decoder(kind) for method, kind in PARAMS.items()
}
send_decoder: msgspec.json.Decoder[SendParams] = PARAMS_DECODERS["send"]
