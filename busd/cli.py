"""``busd <command>``: argparse -> Config -> trio.run for ``serve``; the client
commands (send, inbox, tail, ...) live in ``commands``. Logging is set up here
and nowhere else."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sqlite3
import sys
from typing import Any

from . import __version__, commands
from .config import ConfigError, load
from .db import UnusableDatabase


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the daemon", description="Run the busd daemon.")
    p.add_argument("--config", metavar="PATH", help="TOML file with any of the settings below (kebab-case keys)")
    p.add_argument("--db", metavar="PATH", help="SQLite file (default busd.db)")
    p.add_argument("--host", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", metavar="N", type=int, help="JSON lines + HTTP port (default 7700; 0 picks one)")
    p.add_argument("--http-port", metavar="N", type=int, help="an extra, HTTP-only port")
    p.add_argument("--token", metavar="T", help="shared token every request must carry (or env BUSD_TOKEN)")
    p.add_argument("--tokens-file", metavar="PATH", help="per-agent tokens: 'TOKEN AGENT' per line, '*' = admin")
    p.add_argument("--insecure", action="store_true", default=None, help="allow a non-loopback address without a token")
    p.add_argument("--strict", action="store_true", default=None, help="refuse direct sends to unknown agents")
    p.add_argument("--agents", metavar="a,b,c", help="agents known from the start (receive broadcasts)")
    p.add_argument("--broadcast-per-minute", metavar="N", type=int, help="per sender (default 10; 0 = off)")
    p.add_argument("--direct-per-minute", metavar="N", type=int, help="per sender (default 300; 0 = off)")
    p.add_argument("--inbox-cap", metavar="N", type=int, help="most unread messages per inbox (default 10000)")
    p.add_argument("--max-body", metavar="BYTES", type=int, help="largest message body (default 65536)")
    p.add_argument("--retention-days", metavar="N", type=float, help="delete read messages after N days (default 7)")
    p.add_argument("--max-connections", metavar="N", type=int, help="open connections at most (default 4096)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_serve)


SERVE_OPTIONS = (
    "db host port http_port token tokens_file insecure strict agents broadcast_per_minute "
    "direct_per_minute inbox_cap max_body retention_days max_connections log_level"
).split()


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {name.replace("_", "-"): getattr(args, name) for name in SERVE_OPTIONS}
    if overrides["token"] is None and os.environ.get("BUSD_TOKEN"):
        overrides["token"] = os.environ["BUSD_TOKEN"]
    if overrides["agents"] is not None:
        overrides["agents"] = [a.strip() for a in overrides["agents"].split(",") if a.strip()]
    try:
        config = load(args.config, overrides)
    except ConfigError as e:
        print(f"busd: {e}", file=sys.stderr)
        return 2
    import trio  # here, not at the top: the client commands start faster without it

    from . import app

    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    _raise_fd_limit()
    app.tune_gc()
    try:
        trio.run(app.run, config)
    except Exception as e:
        return _startup_failure(_leaf(e), config.db)
    return 0


def _leaf(e: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups, if there is one."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _startup_failure(e: BaseException, db_path: str) -> int:
    if isinstance(e, ConfigError):
        print(f"busd: {e}", file=sys.stderr)
        return 2
    if isinstance(e, (UnusableDatabase, OSError)):
        print(f"busd: {e}", file=sys.stderr)
        return 1
    if isinstance(e, sqlite3.Error):  # locked, read-only, corrupt
        print(f"busd: cannot use the database {os.path.abspath(db_path)}: {e}", file=sys.stderr)
        return 1
    raise e


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="busd",
        description="A small, durable message bus for AI agents.",
        epilog="Client commands read BUSD_URL (host:port or http://host:port, default localhost:7700), "
        "BUSD_TOKEN and BUSD_AGENT (the default sender and inbox). Exit codes: 0 ok (or queued in the outbox), "
        "2 usage, 3 bus unreachable, 4 refused by the bus.",
    )
    p.add_argument("--version", action="version", version=f"busd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    commands.add_parsers(sub)
    # listed here for --help; main() hands `busd bench ...` to busd.bench whole
    sub.add_parser("bench", help="load generator and benchmarks (busd bench --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench  # imported on use: it is large and loads trio

        return bench.main(argv[1:])
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
