"""`python -m exp.serve [--host H] [--port P] [--runs-dir DIR]`: the job service and its dashboard.

On 127.0.0.1 (the default) no token is needed; any other address needs one (EXP_SERVE_TOKEN or --token-file),
and with a token set every route but /api/health asks for it. Requests must name the bound address, a loopback
name or an --allowed-host in their Host header (a page on a rebound DNS name is refused).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
from pathlib import Path

TOKEN_ENV = "EXP_SERVE_TOKEN"
EXIT_BAD_INPUT = 2


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    """The bearer token: --token-file's first line, else $EXP_SERVE_TOKEN; None when neither is set."""
    if token_file:
        token = Path(token_file).read_text().strip().splitlines()
        return token[0].strip() if token else None
    return os.environ.get(TOKEN_ENV) or None


def served_hosts(bound: str, allowed: list[str]) -> tuple[str, ...]:
    """Host header names accepted beyond the loopback ones: the bound address (a wildcard such as 0.0.0.0 names no
    host a client would use) and the operator's --allowed-host names."""
    wildcard = bound in ("0.0.0.0", "::", "")
    return (*([] if wildcard else [bound]), *allowed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exp.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runs-dir", default="runs", help="where runs go and are found (default runs)")
    parser.add_argument("--token-file", help=f"file holding the bearer token (else ${TOKEN_ENV})")
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PREFIX",
        help="also accept _target_ values under this prefix in configs sent over HTTP (repeatable)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header names NAME, e.g. this machine's name (repeatable; the bound "
        "address and 127.0.0.1, localhost, [::1] always)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    parser.add_argument(
        "--nice",
        type=int,
        default=10,
        help="nice value of the threads answering requests, so that training keeps its cores (default 10; jobs "
        "start at the service's own priority)",
    )
    args = parser.parse_args(argv)
    try:
        token = read_token(args.token_file)
    except OSError as e:
        print(f"error: --token-file {args.token_file}: {e.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not loopback(args.host) and not token:
        print(
            f"error: --host {args.host} is reachable from other machines: set a bearer token "
            f"({TOKEN_ENV}=... or --token-file FILE), or bind 127.0.0.1",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        import uvicorn

        from exp.serve import Settings, create_app
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = Settings(
        runs_dir=Path(args.runs_dir),
        token=token,
        hosts=served_hosts(args.host, args.allowed_host),
        allow_targets=tuple(args.allow_target),
        max_body_bytes=args.max_body_bytes,
    )
    app = create_app(settings)  # its job-spawning thread keeps this process's priority
    if args.nice:  # this thread runs the event loop; the request threads it creates inherit the value
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.nice)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
