"""The transport-neutral core of the server (KServe's data plane): models, their lifecycle and control, the protocol
operations, and the one inference sequence every transport goes through.

The transports (``rest``: aiohttp; ``fastpath``: whole plain HTTP infer requests; ``grpc_native`` and ``grpc_aio``:
gRPC; ``workers``: several processes) are adapters: they turn bytes into calls of :class:`DataPlane` and its
answers or :class:`resdeploy.serve.protocol.ServeError` into bytes. None of them checks, batches, encodes or counts
statistics itself: :meth:`DataPlane.infer` does, in this order:

1. admit: the server is not draining, the model version exists and serves (else Unavailable / NotFound);
2. parse (the adapter's decoder) and check the inputs and outputs against the model (else BadRequest);
3. queue on the model's dynamic batcher with the request's timeout, bounded by the caller's deadline;
4. encode the outputs (the adapter's encoder) and record the success, or record the failure;
5. answer through ``done``: a result, or a ServeError (a bug becomes InternalError, logged; a deadline that passed
   becomes DeadlineExceeded); CancelledError when the caller cancelled the handle.

Like Triton, a request refused in steps 1-2 is neither a success nor a failure of the model in its statistics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import resdeploy
from resdeploy.errors import InputError
from resdeploy.serve.batching import Done, awaited
from resdeploy.serve.config import ServerConfig
from resdeploy.serve.loading import LoadedModel, ModelLoader
from resdeploy.serve.metrics import ModelStats, prometheus_text
from resdeploy.serve.protocol import (BadRequest, DeadlineExceeded, InferRequest, InternalError, NotFound, ServeError,
                                      Unavailable, check_inputs, check_outputs)
from resdeploy.serve.repository import repository_models, scan_model, scan_repository

log = logging.getLogger("resdeploy.serve")

EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics", "model_repository"]
CONTROL_OFF = ("explicit model load / unload is not allowed in model control mode none; start the server with "
               "--model-control-mode explicit to load and unload models")
SHUTTING_DOWN = "server is shutting down; retry on another replica"

Parse = Callable[[LoadedModel], InferRequest]
Encode = Callable[[LoadedModel, InferRequest, dict], Any]


class DataPlane:
    """The served models of one repository and every operation on them; no I/O of its own but loading."""

    def __init__(self, repo: str | Path, config: ServerConfig | None = None) -> None:
        self.repo = Path(repo)
        self.config = config or ServerConfig()
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.loader = ModelLoader(self.config)
        self.loading = True
        self.draining = False
        self.inflight = 0  # inference requests queued or running (every transport)
        self._control = asyncio.Lock()  # one load/unload at a time
        self._releasing: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """The models the start loads: every one, or (explicit model control) those of --load-model."""
        loop = asyncio.get_running_loop()
        c = self.config
        entries = await loop.run_in_executor(None, lambda: scan_repository(self.repo, follow_symlinks=c.follow_symlinks))
        if c.model_control_mode == "explicit":
            wanted = set(c.load_models)
            if "*" not in wanted:
                for name in sorted(wanted - {e.name for e in entries}):
                    log.error("--load-model %s: the repository %s has no model folder of that name", name, self.repo)
                entries = [e for e in entries if e.name in wanted]
        await self.loader.load(entries, self.models)
        self.loading = False

    @property
    def ready(self) -> bool:
        if self.loading or self.draining:
            return False
        served = [m for vs in self.models.values() for m in vs.values() if not m.unloaded]
        return all(m.ready for m in served) if self.config.strict_readiness else True

    def begin_drain(self) -> None:
        """Readiness false and every new request refused (Unavailable) from now on; accepted ones go on."""
        if not self.draining:
            self.draining = True
            log.info("shutdown requested: not ready; %d inference request(s) in flight", self.inflight)

    async def close(self, timeout_s: float) -> None:
        """After the drain: wait for unloads in progress (at most ``timeout_s``), then close every model."""
        if self._releasing:
            await asyncio.wait(list(self._releasing), timeout=max(0.1, timeout_s))
        for vs in self.models.values():
            for m in vs.values():
                ModelLoader.close_now(m)

    # -- lookup ----------------------------------------------------------------------------------------
    def lookup(self, name: str, version: str | None) -> LoadedModel:
        """The model version (any state); NotFound for an unknown model or version."""
        versions = self.models.get(name)
        if version in (None, "") and versions is not None and len(versions) == 1:
            (m,) = versions.values()  # the common case (one version), without the search below on every request
            return m
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model '{name[:200]}'; this server has: {known}")
        if version in (None, ""):  # like Triton: the highest version that is ready, else the highest
            ready = [v for v, m in versions.items() if m.ready]
            return versions[max(ready or versions, key=int)]
        if version not in versions:
            raise NotFound(f"model '{name}' has no version '{version[:40]}'; versions: {', '.join(sorted(versions, key=int))}")
        return versions[version]

    def available(self, name: str, version: str | None) -> LoadedModel:
        """A version that serves (metadata, config, infer). Like Triton, a model that failed to load or was unloaded
        is unknown (NotFound, with the reason); one still loading at start is Unavailable (retry)."""
        m = self.lookup(name, version)
        if m.ready:
            return m
        if m.state == "LOADING":
            raise Unavailable(f"model '{m.name}' version {m.version} is not ready yet: loading; retry shortly")
        if version in (None, ""):
            reasons = "; ".join(f"version {v}: {x.reason}" for v, x in sorted(self.models[name].items(), key=lambda kv: int(kv[0])))
            raise NotFound(f"unknown model: '{name}' has no available versions ({reasons})")
        raise NotFound(f"unknown model: '{name}' version {version} is not available ({m.reason})")

    # -- protocol operations ---------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "resdeploy", "version": resdeploy.__version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        """(ready, why not). Unknown models and versions are simply not ready, as on Triton."""
        try:
            m = self.lookup(name, version)
        except NotFound as exc:
            return False, str(exc)
        if self.draining:
            return False, "server is shutting down"
        return m.ready, "" if m.ready else (m.reason or "loading")

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.available(name, version)
        served = self.models[m.name]
        return {"name": m.name, "versions": [v for v in m.entry.versions_available or [m.version]
                                             if served.get(v) is not None and served[v].ready],
                "platform": m.entry.config.platform or m.entry.config.backend,
                "inputs": [s.to_json() for s in m.inputs], "outputs": [s.to_json() for s in m.outputs]}

    def stats(self, name: str | None, version: str | None) -> list[ModelStats]:
        """Statistics of the available versions. Like Triton, an unknown or unavailable model or version is a
        BadRequest (400 / INVALID_ARGUMENT), and the all-models form lists available versions only."""
        if not name:
            return [m.stats for vs in self.models.values() for m in vs.values() if m.ready]
        versions = self.models.get(name, {})
        if version:
            m = versions.get(version)
            if m is None or not m.ready:
                raise BadRequest(f"requested model version is not available for model '{name[:200]}' (version "
                                 f"{version[:40]} {'is ' + m.state if m else 'is unknown'}); see the repository index")
            return [m.stats]
        ready = [m.stats for _, m in sorted(versions.items(), key=lambda kv: int(kv[0])) if m.ready]
        if not ready:
            raise BadRequest(f"requested model '{name[:200]}' is not available "
                             f"({'no version is ready' if versions else 'unknown model'}); see the repository index")
        return ready

    def metrics_text(self) -> str:
        """Prometheus exposition of every model version's statistics (Triton's metric names)."""
        return prometheus_text([m.stats for vs in self.models.values() for m in vs.values()])

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        names = set(self.models)
        if self.config.model_control_mode == "explicit":
            try:
                names |= set(repository_models(self.repo))
            except InputError:
                pass
        rows: list[dict[str, str]] = []
        for name in sorted(names):
            vs = self.models.get(name)
            if not vs:
                if not ready_only:
                    rows.append({"name": name})  # in the repository, never loaded (explicit model control)
                continue
            for _, m in sorted(vs.items(), key=lambda kv: int(kv[0])):
                if ready_only and not m.ready:
                    continue
                row = {"name": m.name, "version": m.version, "state": m.state}
                if m.reason:
                    row["reason"] = m.reason
                rows.append(row)
        return rows

    # -- inference: the one sequence -------------------------------------------------------------------
    def infer(self, name: str, version: str | None, parse: Parse, encode: Encode, done: Done,
              deadline: float | None = None) -> asyncio.Future | None:
        """Run one inference request (see the module docstring); ``done(result, error)`` is called exactly once,
        on the loop, possibly before this returns. ``deadline``: the caller's own (``time.monotonic()``), if any.
        Returns the queued request's handle (cancel it to drop the request) or None when it was refused."""
        t0 = time.perf_counter_ns()
        try:
            m = self._admit(name, version)
            req = parse(m)
            batch = check_inputs(req, m.inputs, m.name, m.max_batch_size)
            check_outputs(req, [s.name for s in m.outputs], m.name)
            timeout_us = self._timeout_us(m, req, deadline)
        except Exception as exc:  # noqa: BLE001 - refused before it was queued: not in the statistics
            done(None, self._as_serve_error(exc, f"infer request to '{name[:200]}'"))
            return None
        assert m.batcher is not None
        self.inflight += 1

        def finished(outputs: Any, exc: BaseException | None) -> None:
            self.inflight -= 1
            if exc is None:
                try:
                    result = encode(m, req, outputs)
                except Exception as e:  # noqa: BLE001 - an encoding failure is the request's answer
                    exc = e
                else:
                    m.stats.record_success(time.perf_counter_ns() - t0)
                    done(result, None)
                    return
            if isinstance(exc, asyncio.CancelledError):  # the caller cancelled: nobody to answer, nothing to count
                done(None, exc)
                return
            err = self._as_serve_error(exc, f"infer on '{m.name}'")
            m.stats.record_failure(time.perf_counter_ns() - t0, "REJECTED" if isinstance(err, Unavailable)
                                   else "BACKEND" if err.status >= 500 else "OTHER")
            if deadline is not None and isinstance(err, Unavailable) and time.monotonic() >= deadline:
                err = DeadlineExceeded(f"gRPC deadline exceeded: {err}")
            done(None, err)

        try:
            return m.batcher.call(req.inputs, batch, timeout_us, finished)
        except ServeError as exc:  # a full queue or a model shutting down: refused before it was queued
            finished(None, exc)
            return None

    async def infer_async(self, name: str, version: str | None, parse: Parse, encode: Encode,
                          deadline: float | None = None) -> Any:
        """:meth:`infer` awaited: the encoded result, or its ServeError raised."""
        return await awaited(lambda done: self.infer(name, version, parse, encode, done, deadline))

    def _admit(self, name: str, version: str | None) -> LoadedModel:
        if self.draining:
            raise Unavailable(SHUTTING_DOWN)
        m = self.available(name, version)
        if m.batcher is None:
            raise Unavailable(f"model '{m.name}' version {m.version} is not ready: {m.error or 'loading'}")
        return m

    def _timeout_us(self, m: LoadedModel, req: InferRequest, deadline: float | None) -> int:
        """The request's own timeout, else the model's default, else --request-timeout; within the deadline."""
        assert m.batcher is not None
        timeout_us = req.timeout_us or m.batcher.config.default_timeout_us or int(self.config.request_timeout_s * 1e6)
        if deadline is None:
            return timeout_us
        left_us = int((deadline - time.monotonic()) * 1e6)
        if left_us <= 0:
            raise DeadlineExceeded("gRPC deadline exceeded before the request was queued")
        return min(timeout_us, left_us)

    @staticmethod
    def _as_serve_error(exc: BaseException, what: str) -> ServeError:
        if isinstance(exc, ServeError):
            return exc
        log.error("internal error in %s", what, exc_info=exc)  # a bug must not take the server down
        return InternalError(f"internal server error: {type(exc).__name__}: {exc}")

    # -- model control (explicit mode) -----------------------------------------------------------------
    def _control_allowed(self) -> None:
        if self.config.model_control_mode != "explicit":
            raise Unavailable(CONTROL_OFF)
        if self.draining:
            raise Unavailable("server is shutting down; load or unload models on another replica")

    async def load(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Load (or reload) one model from the repository, as Triton's explicit model control: the versions its
        policy selects replace the ones served once they are ready; on failure a served model keeps serving."""
        self._control_allowed()
        override = config_override(name, parameters or {})
        async with self._control:
            loop = asyncio.get_running_loop()
            try:
                entries = await loop.run_in_executor(None, lambda: scan_model(
                    self.repo, name, follow_symlinks=self.config.follow_symlinks, config=override))
            except InputError as exc:
                raise BadRequest(str(exc)) from None
            staged: dict[str, dict[str, LoadedModel]] = {}
            await self.loader.load(entries, staged)
            new = staged.get(name, {})
            failed = [m for m in new.values() if not m.ready]
            old = self.models.get(name, {})
            if failed and any(m.ready for m in old.values()):
                for m in new.values():
                    self._retire(m)
                raise BadRequest(f"failed to load '{name}': {failed[0].reason}; the versions already served stay")
            self.models[name] = new
            for m in old.values():
                self._retire(m)
            if failed:
                raise BadRequest(f"failed to load '{name}': {failed[0].reason}")
            log.info("model '%s' loaded (versions %s)", name, ", ".join(sorted(new, key=int)))

    async def unload(self, name: str) -> None:
        """Unload every version of ``name``: new requests get 'unknown model'; those already accepted finish first.
        Unloading a model that is not loaded succeeds, as on Triton."""
        self._control_allowed()
        async with self._control:
            for m in self.models.get(name, {}).values():
                if not m.unloaded:
                    self._retire(m)
                    m.ready, m.unloaded, m.error = False, True, None
            if name in self.models:
                log.info("model '%s' unloaded", name)

    def _retire(self, m: LoadedModel) -> None:
        """Stop serving ``m`` now and release it once its accepted requests are done (in the background)."""
        m.ready = False
        batcher, runners = m.batcher, m.runners
        m.batcher, m.runners = None, []
        task = asyncio.ensure_future(self.loader.release(m.name, batcher, runners, self.config.shutdown_timeout_s))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)


def config_override(name: str, params: dict[str, Any]) -> Any:
    """A load request's ``config`` parameter (ModelConfig JSON, as Triton takes it) as a ModelConfig, or None."""
    from google.protobuf import json_format

    files = sorted(k for k in params if isinstance(k, str) and k.startswith("file:"))
    if files:
        raise BadRequest(f"load parameters {files[:3]} carry model files in the request; resdeploy loads models only "
                         "from the repository folder. Put the files in the repository and load the model by name")
    text = params.get("config")
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadRequest(f"load parameter 'config' of '{name}' must be a string of ModelConfig JSON")
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        return json_format.Parse(text, pb.ModelConfig())
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        raise BadRequest(f"load parameter 'config' of '{name}' is not ModelConfig JSON: {str(exc)[:300]}; "
                         "send the model configuration as /v2/models/<m>/config prints it") from None


__all__ = ["CONTROL_OFF", "DataPlane", "EXTENSIONS", "LoadedModel", "SHUTTING_DOWN", "config_override"]
