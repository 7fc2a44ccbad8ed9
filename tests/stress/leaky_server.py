"""A server with a deliberately leaking infer handler (it keeps every request body), for the stress suite's
proof that its RSS check can fail. Test-only: nothing in resdeploy has such a switch.

    python tests/stress/leaky_server.py REPO PORT
"""

from __future__ import annotations

import asyncio
import logging
import sys

from resdeploy.serve.server import ModelServer, ServerConfig

KEPT: list[bytes] = []


class LeakyServer(ModelServer):
    async def h_infer(self, request):  # noqa: ANN001, ANN201 - aiohttp types
        KEPT.append(bytes(await request.read()) * 8)  # the leak: ~8x each body, never freed
        return await super().h_infer(request)

    def fast_infer(self, handler, data: bytes):  # noqa: ANN001, ANN201 - the HTTP fast path leaks the same way
        KEPT.append(bytes(data) * 8)
        return super().fast_infer(handler, data)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = ServerConfig(port=int(sys.argv[2]), threads=1, strict_readiness=False, grpc_port=None)
    sys.exit(asyncio.run(LeakyServer(sys.argv[1], cfg).run()))
