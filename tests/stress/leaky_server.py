"""A server whose core deliberately leaks (it keeps ~8x every request's input tensors), for the stress suite's
proof that its RSS check can fail. Test-only: nothing in resdeploy has such a switch. Every transport goes
through the core's one inference sequence, so one override leaks on the fast path and aiohttp's route alike.

    python tests/stress/leaky_server.py REPO PORT
"""

from __future__ import annotations

import asyncio
import logging
import sys

import numpy as np

from resdeploy.serve.config import ServerConfig
from resdeploy.serve.core import DataPlane
from resdeploy.serve.server import ModelServer

KEPT: list[np.ndarray] = []


class LeakyCore(DataPlane):
    def infer(self, name, version, parse, encode, done, deadline=None):  # noqa: ANN001, ANN201 - the core's signature
        def leaky_parse(m):  # noqa: ANN001, ANN202
            req = parse(m)
            KEPT.append(np.concatenate([np.asarray(a, np.float32).ravel() for a in req.inputs.values()] * 8))
            return req

        return super().infer(name, version, leaky_parse, encode, done, deadline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = ServerConfig(port=int(sys.argv[2]), threads=1, strict_readiness=False, grpc_port=None)
    sys.exit(asyncio.run(ModelServer(sys.argv[1], cfg, LeakyCore(sys.argv[1], cfg)).run()))
