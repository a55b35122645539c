"""`python -m sandbox [--host H] [--port P]`: run the provider simulator until SIGINT/SIGTERM.

Prints one line `sandbox listening on http://H:P` when ready (port 0 picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from sandbox.server import SandboxRefused, config_from_settings, refuse_unless_safe, serve
from worker.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--host", default=settings.sandbox_host)
    parser.add_argument("--port", type=int, default=settings.sandbox_port)
    parser.add_argument("--seed", type=int, default=None, help="seed for the 90 %% approval draw")
    parser.add_argument("--review-delay", type=float, default=None, help="Sumsub review delay, seconds")
    args = parser.parse_args(argv)
    try:
        refuse_unless_safe(settings.drop_env, args.host)
    except SandboxRefused as refused:
        print(f"sandbox: {refused}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sandbox %(levelname)s %(message)s")

    config = config_from_settings()
    config.seed = args.seed
    if args.review_delay is not None:
        config.review_delay_s = args.review_delay

    def ready(url: str) -> None:
        print(f"sandbox listening on {url}", flush=True)

    async def run() -> None:
        task = asyncio.ensure_future(serve(args.host, args.port, config, ready=ready))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
