"""Command line entry point: ``python -m stubapi``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType

from stubapi.server import StubServer

logger = logging.getLogger("stubapi")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stubapi",
        description="Serve a local stand-in for the Anthropic Messages API.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="TCP port to bind; 0 picks a free port (default: 0)",
    )
    parser.add_argument(
        "--port-file",
        type=Path,
        help="file to write the bound port to, replaced atomically",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    return parser.parse_args(argv)


def write_port_file(path: Path, port: int) -> None:
    """Write port to path through a temporary file and a rename.

    A reader polling for path finds either no file or the complete port.
    """
    path = path.resolve()
    descriptor, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{port}\n")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = StubServer((args.host, args.port))
    host, port = server.server_address[:2]

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("Received %s, stopping.", signal.Signals(signum).name)
        # shutdown() waits for serve_forever(), which runs in this main thread,
        # so it must be called from another thread.
        threading.Thread(target=server.stop, name="stubapi-stop").start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    if args.port_file is not None:
        write_port_file(args.port_file, port)
    logger.info("Listening on %s:%d.", host, port)
    try:
        server.serve_forever()
    finally:
        server.state.stopping.set()
    logger.info("Stopped after %d requests.", server.state.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
