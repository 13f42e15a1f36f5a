"""One frozen Config: defaults, an optional TOML file, command-line overrides,
then the checks that make a bad setting fail at start-up with one clear line."""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .wire import NAME_PATTERN

Port = Annotated[int, Meta(ge=0, le=65535)]
NonNegative = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]

ADMIN = "*"  # the agent column of a tokens-file line that may act as anyone


class ConfigError(Exception):
    """A setting that cannot work; the message names it."""


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    db: str = "busd.db"
    host: str = "127.0.0.1"
    port: Port = 7700
    http_port: Port | None = None
    token: str | None = None
    tokens_file: str | None = None
    insecure: bool = False
    strict: bool = False
    agents: tuple[Annotated[str, Meta(pattern=NAME_PATTERN)], ...] = ()
    broadcast_per_minute: NonNegative = 10
    direct_per_minute: NonNegative = 300
    inbox_cap: Positive = 10_000
    max_body: Annotated[int, Meta(ge=1, le=16 * 1024 * 1024)] = 64 * 1024
    retention_days: Annotated[float, Meta(gt=0)] = 7.0
    max_connections: Positive = 4096
    # Durability of a commit. FULL is the contract; NORMAL exists only so the
    # power-loss test can show that it matters. Never lower it in production.
    synchronous: Literal["FULL", "EXTRA", "NORMAL"] = "FULL"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def load(path: str | None, overrides: dict[str, Any]) -> Config:
    """Build the Config from an optional TOML file plus explicit overrides
    (keys in kebab-case, as in the file). Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = msgspec.toml.decode(f.read())
        except OSError as e:
            raise ConfigError(f"--config {path}: {e.strerror}") from None
        except msgspec.DecodeError as e:
            raise ConfigError(f"--config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: not a table")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(str(e))) from None
    check(config)
    return config


def _explain(msg: str) -> str:
    # msgspec says "... - at `$.http-port`"; name the option instead
    m = re.search(r"`\$\.([a-z-]+)", msg)
    if m:
        return f"--{m.group(1)}: {msg.split(' - at ')[0]}"
    m = re.search(r"unknown field `([^`]+)`", msg, re.I)
    if m:
        return f"unknown setting {m.group(1)!r}"
    return msg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(config: Config) -> None:
    """Rules that span several settings."""
    for name in config.agents:
        if name.upper() == "ALL":
            raise ConfigError("--agents: ALL is reserved")
    if config.token is not None and not config.token:
        raise ConfigError("--token: empty")
    if not is_loopback(config.host) and not (config.token or config.tokens_file) and not config.insecure:
        raise ConfigError(
            f"--host {config.host}: refusing to listen beyond loopback without a token "
            "(give --token or --tokens-file, or --insecure)"
        )


class Tokens:
    """Who a token is. ``identify`` compares against every configured token in
    constant time and returns the agent it belongs to (ADMIN for the shared
    token), or None."""

    def __init__(self, shared: str | None, per_agent: dict[str, str]) -> None:
        pairs = [(t.encode(), a) for t, a in per_agent.items()]
        if shared:
            pairs.append((shared.encode(), ADMIN))
        self._pairs = pairs

    @property
    def required(self) -> bool:
        return bool(self._pairs)

    def identify(self, token: str | None) -> str | None:
        given = (token or "").encode()
        found = None
        for known, agent in self._pairs:
            if hmac.compare_digest(given, known) and found is None:
                found = agent
        return found

    @classmethod
    def from_config(cls, config: Config) -> Tokens:
        per_agent: dict[str, str] = {}
        if config.tokens_file:
            per_agent = read_tokens_file(config.tokens_file)
        return cls(config.token, per_agent)


def read_tokens_file(path: str) -> dict[str, str]:
    """``TOKEN AGENT`` per line, ``#`` comments; ``*`` as the agent means admin."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--tokens-file {path}: {e.strerror}") from None
    tokens: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[1] == ADMIN or re.match(NAME_PATTERN, parts[1])):
            raise ConfigError(f"--tokens-file {path}:{n}: expected 'TOKEN AGENT'")
        if parts[1].upper() == "ALL":
            raise ConfigError(f"--tokens-file {path}:{n}: ALL is reserved")
        tokens[parts[0]] = parts[1]
    return tokens
