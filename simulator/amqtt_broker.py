"""Run amqtt on host:port until killed: ``python -m simulator.amqtt_broker 127.0.0.1 1883``."""

from __future__ import annotations

import asyncio
import logging
import sys


async def _main(host: str, port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    host, port = sys.argv[1], int(sys.argv[2])
    asyncio.run(_main(host, port))


if __name__ == "__main__":
    main()
