"""Dynamic batching: requests queue per model and are merged into one execution, run off the event loop.

The policy (Triton's dynamic batcher, plus one rule for latency):

* A batch is formed when a runner instance is free, at the end of the event loop's turn in which requests
  arrived (so the requests the loop parsed together, from all the sockets one poll found ready, are one batch).
  It takes queued requests in arrival order whose per-sample shapes match the oldest one, up to
  ``max_batch_size`` samples.
* It is dispatched at once when it is full, when it reaches a preferred size (then it is cut to the largest
  preferred size it can make), when nothing is executing
  (an idle server never makes a lone request wait: batch-1 latency does not pay ``max_queue_delay``), or
  when the oldest request has waited ``max_queue_delay``. Otherwise it waits for more requests until then.
* While every instance is busy, requests pile up and the next free instance takes them all: under load
  batches grow by themselves even with a zero delay.
* An instance whose execution ends takes its next batch itself, on its own thread, when the queue already holds
  one that may run: it does not hand its runner back to the loop and wait to be woken with the next batch.
  Under load the model's thread then goes from one execution straight to the next while the loop answers the
  last batch (the two hand-offs cost ~0.5 ms per 1.7 ms execution at 16 clients).
* The queue is bounded (``max_queue_size``): one more request is rejected at once (503), never queued.
* Requests carry a deadline; one that expires or is cancelled before it runs is dropped from the queue.

The batcher records executions and per-request queue/compute times in ``stats``; whoever awaits the
request (the server) records its success or failure, so nothing is counted twice.

Everything here runs on the event loop except ``Runner.infer`` (and the concatenation/split around it), and
that next-batch take, which runs in a thread pool with one thread per instance; each instance owns its runner.
The queue is shared with those threads under ``_lock``; futures, stats and timers are touched on the loop only.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from resdeploy.serve.metrics import ModelStats
from resdeploy.errors import InputError
from resdeploy.serve.protocol import BadRequest, ServeError, Unavailable
from resdeploy.engines.base import RunnerError


# A lone request runs on the event loop (no thread hand-off) while batch-1 executions take less than this.
INLINE_MAX_NS = 1_000_000


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 0  # 0: the model has no batch axis; every request runs alone
    dynamic: bool = True  # False: Triton's default scheduler, one request per execution
    preferred_batch_sizes: tuple[int, ...] = ()  # dispatch as soon as one of these sizes is reached
    max_queue_delay_us: int = 0  # wait at most this long for a fuller batch (only while something executes)
    max_queue_size: int = 0  # queued requests beyond this are rejected with 503; 0 = unbounded
    default_timeout_us: int = 0  # a request's deadline when it gives none; 0 = none

    def __str__(self) -> str:
        if not self.dynamic or self.max_batch_size == 0:
            return f"no dynamic batching (max_batch_size {self.max_batch_size})"
        return (f"dynamic batching to {self.max_batch_size}, preferred {list(self.preferred_batch_sizes) or '-'}, "
                f"delay {self.max_queue_delay_us} us, queue {self.max_queue_size or 'unbounded'}")


@dataclass
class _Item:
    feed: dict[str, np.ndarray]
    batch: int
    signature: tuple
    future: asyncio.Future
    enqueued_ns: int
    deadline_ns: int | None


@dataclass(frozen=True)
class ExecutionRecord:
    """What one execution did: how many requests, how many samples, and its timings (ns)."""

    requests: int
    batch_size: int
    input_ns: int
    infer_ns: int
    output_ns: int


Done = Callable[[Any, BaseException | None], None]


async def awaited(start: Callable[[Done], asyncio.Future | None]) -> Any:
    """Await a callback-style call: ``start(done)`` begins it and returns a handle to cancel it (or None);
    ``done(result, None)`` or ``done(None, error)`` is called once, on the loop, possibly before ``start``
    returns. Cancelling the awaiting task cancels the handle (a queued request is dropped)."""
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    def done(value: Any, exc: BaseException | None) -> None:
        if result.done():
            return
        if exc is None:
            result.set_result(value)
        elif isinstance(exc, asyncio.CancelledError):
            result.cancel()
        else:
            result.set_exception(exc)

    handle = start(done)
    try:
        return await result
    except asyncio.CancelledError:
        if handle is not None:
            handle.cancel()  # the caller went away (a gRPC cancel, a disconnect): drop the queued request
        raise


class DynamicBatcher:
    """Queue + batch former + thread pool over ``runners`` (one per instance).

    ``await batcher.submit(feed, batch)`` returns the outputs for that request alone. The feed must
    already be validated against the model (shape, dtype), so a batch never fails for one request's input.
    """

    def __init__(self, runners: Sequence[Any], config: BatcherConfig, stats: ModelStats | None = None,
                 name: str = "model") -> None:
        if not runners:
            raise InputError("DynamicBatcher needs at least one runner instance")
        self.config = config
        self.name = name
        self.stats = stats or ModelStats(name, "1")
        self._free = list(runners)
        self._n_instances = len(runners)
        self._queue: collections.deque[_Item] = collections.deque()
        self._lock = threading.Lock()  # the queue, between the loop and the instance threads' next-batch take
        self._executing = 0
        self._pool = ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix=f"infer-{name}")
        self._timer: asyncio.TimerHandle | None = None
        self._dispatch_pending = False  # a _dispatch is scheduled for the end of this loop turn
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.executions: collections.deque[ExecutionRecord] = collections.deque(maxlen=4096)
        self._last_requests = 0  # requests in the last execution (1: nobody else was waiting)
        self._inline_ewma_ns = INLINE_MAX_NS  # batch-1 executions' compute time, smoothed
        self.on_execution: Callable[[ExecutionRecord], None] | None = None

    # -- public ----------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return sum(1 for it in self._queue if not it.future.done())

    @property
    def executing(self) -> int:
        return self._executing

    def submit(self, feed: dict[str, np.ndarray], batch: int = 1, timeout_us: int | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its outputs or raises a ServeError. Call on the loop."""
        if self._closed:
            raise Unavailable(f"model '{self.name}' is shutting down; retry on another replica")
        loop = asyncio.get_running_loop()
        if self.config.max_queue_size and len(self._queue) >= self.config.max_queue_size:
            self._prune()
            if len(self._queue) >= self.config.max_queue_size:
                raise Unavailable(f"model '{self.name}' is overloaded: {len(self._queue)} requests queued "
                                  f"(max_queue_size {self.config.max_queue_size}); retry later or add instances")
        now = time.perf_counter_ns()
        timeout = timeout_us or self.config.default_timeout_us
        sig = tuple((k, v.dtype.str, v.shape[1:] if self.config.max_batch_size else v.shape) for k, v in sorted(feed.items()))
        item = _Item(feed, batch, sig, loop.create_future(), now, now + timeout * 1000 if timeout else None)
        with self._lock:
            self._queue.append(item)
        self.stats.pending += 1
        self._idle.clear()
        # Batch forming waits for the end of this loop turn, not for this request alone: the loop parses every
        # request that arrived together (16 clients' sockets in one select) before any of them is dispatched, so
        # they form one batch. Dispatching at once formed a batch of 1 and ran it on the loop (the inline path),
        # which kept the others unparsed meanwhile: 435 of 700 executions were batch 1 at 16 clients (a
        # profile). A lone request pays one loop turn, microseconds.
        if not self._dispatch_pending:
            self._dispatch_pending = True
            loop.call_soon(self._dispatch)
        return item.future

    def call(self, feed: dict[str, np.ndarray], batch: int, timeout_us: int | None,
             done: Callable[[dict[str, np.ndarray] | None, BaseException | None], None]) -> asyncio.Future:
        """Queue one request and call ``done(outputs, None)`` or ``done(None, error)`` once, on the loop.

        No task or coroutine per request (the HTTP fast path answers from ``done``). A deadline that passes,
        queued or executing, ends it with Unavailable. Cancelling the returned future drops the request
        (``done`` then gets CancelledError). A full or closed queue raises here, before anything is queued."""
        fut = self.submit(feed, batch, timeout_us)
        timeout = timeout_us or self.config.default_timeout_us
        # The queue drops expired items itself; this timer bounds a request whose execution overruns too. One
        # TimerHandle per request (wait_for + shield cost a task and two futures per request, as profiled).
        expired = False

        def expire() -> None:
            nonlocal expired
            if not fut.done():
                expired = True
                fut.cancel()

        timer = asyncio.get_running_loop().call_later(timeout / 1e6 + 0.001, expire) if timeout else None

        def finished(f: asyncio.Future) -> None:
            if timer is not None:
                timer.cancel()
            if f.cancelled():
                done(None, Unavailable(f"model '{self.name}': request timed out after {timeout / 1000:.1f} ms; "
                                       "raise the timeout or reduce the load") if expired else asyncio.CancelledError())
            elif (exc := f.exception()) is not None:
                done(None, exc)
            else:
                done(f.result(), None)

        fut.add_done_callback(finished)
        return fut

    async def infer(self, feed: dict[str, np.ndarray], batch: int = 1, timeout_us: int | None = None) -> dict[str, np.ndarray]:
        """``call`` awaited: the outputs, or the request's ServeError raised; cancelling drops the request."""
        return await awaited(lambda done: self.call(feed, batch, timeout_us, done))

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or executing (True) or ``timeout_s`` passes (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        """Reject what is still queued and stop the threads (after in-flight executions finish)."""
        with self._lock:
            self._closed = True
            left, self._queue = self._queue, collections.deque()
        for it in left:
            if not it.future.done():
                it.future.set_exception(Unavailable(f"model '{self.name}' shut down before the request ran"))
        self._pool.shutdown(wait=True)

    # -- batch forming ---------------------------------------------------------------------------------
    def _prune(self) -> None:
        with self._lock:
            if not any(it.future.done() for it in self._queue):
                return
            kept = [it for it in self._queue if not it.future.done()]
            dropped = len(self._queue) - len(kept)
            self._queue = collections.deque(kept)
        self.stats.pending -= dropped
        self._check_idle()

    def _expire(self, now: int) -> None:
        for it in list(self._queue):
            if it.deadline_ns is not None and now >= it.deadline_ns and not it.future.done():
                it.future.set_exception(Unavailable(
                    f"model '{self.name}': request timed out after {(now - it.enqueued_ns) / 1e6:.1f} ms in the queue; "
                    "raise the timeout or reduce the load"))
        self._prune()

    def _take(self, now: int, executing: int) -> tuple[list[_Item] | None, int | None]:
        """The batch to run now, or (None, when to look again in perf_counter ns). ``executing``: the executions
        under way besides the one this batch is for. Call with ``_lock`` held and the queue not empty."""
        cfg = self.config
        head = self._queue[0]
        if not cfg.dynamic or cfg.max_batch_size == 0:
            return [self._queue.popleft()], None
        chosen, total = [], 0
        for it in self._queue:
            if it.signature != head.signature:
                continue
            if total + it.batch > cfg.max_batch_size:
                break
            chosen.append(it)
            total += it.batch
        full = total == cfg.max_batch_size
        pref = 0
        if cfg.preferred_batch_sizes:
            running = 0
            for i, it in enumerate(chosen):  # the longest prefix whose size is a preferred one
                running += it.batch
                if running in cfg.preferred_batch_sizes:
                    pref = i + 1
        waited = now - head.enqueued_ns >= cfg.max_queue_delay_us * 1000
        if not (full or pref or executing == 0 or waited):
            return None, head.enqueued_ns + cfg.max_queue_delay_us * 1000
        if pref and not full:  # Triton forms the largest preferred batch it can rather than an odd size
            chosen = chosen[:pref]
        ids = {id(it) for it in chosen}
        self._queue = collections.deque(it for it in self._queue if id(it) not in ids)
        return chosen, None

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.perf_counter_ns()
        self._expire(now)
        if (len(self._queue) == 1 and self._executing == 0 and self._last_requests == 1 and self._free
                and self._inline_ewma_ns < INLINE_MAX_NS and self._n_instances == 1):
            self._run_inline(now)
            return
        while self._free and self._queue:
            with self._lock:
                items, wake_at = self._take(now, self._executing) if self._queue else (None, None)
            if items is None:
                if wake_at is None:  # an instance thread took the queue meanwhile
                    break
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(0.0, (wake_at - now) / 1e9), self._dispatch)
                return
            runner = self._free.pop()
            self._executing += 1
            self._pool.submit(self._run, asyncio.get_running_loop(), runner, items, time.perf_counter_ns())
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queue and self._executing == 0:
            self._idle.set()

    def _run_inline(self, now: int) -> None:
        """A lone request on an idle model whose executions take microseconds runs right here on the loop: the two
        thread hand-offs (pool submit, call_soon_threadsafe) cost about as much as the model itself (a
        1-client profile). Only when the last execution also held a single request (nobody else is waiting, so the
        loop has nothing to overlap with) and batch-1 compute stays under INLINE_MAX_NS."""
        with self._lock:
            items = [self._queue.popleft()]
        runner = self._free.pop()
        self._executing += 1
        try:
            result, exc = self._execute(runner, items), None
        except Exception as e:  # delivered to the request, as from the thread
            result, exc = None, e
        self._finished(result, exc, runner, items, now)

    # -- execution (worker thread) ---------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, runner: Any, items: list[_Item], start_ns: int) -> None:
        # One hop back to the loop per batch (run_in_executor would chain two futures and more loop turns); the
        # runner stays on this thread while the queue holds a batch that may run now.
        while items:
            try:
                result, exc = self._execute(runner, items), None
            except BaseException as e:  # delivered to every request of the batch
                result, exc = None, e
            following = self._take_next() if exc is None else None
            try:
                loop.call_soon_threadsafe(self._finished, result, exc, runner, items, start_ns, following is not None)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
            items, start_ns = following, time.perf_counter_ns()

    def _take_next(self) -> list[_Item] | None:
        """On an instance thread whose execution just ended: the next batch, if the queue holds one that may run
        now and nothing in it needs the loop first (an expired deadline, a cancelled request: the loop ends those).
        Else None, and the runner goes back to the loop, which dispatches as before."""
        if not self._queue:  # read without the lock: a request queued just now is the loop's to dispatch
            return None
        now = time.perf_counter_ns()
        with self._lock:
            if self._closed or not self._queue:
                return None
            for it in self._queue:
                if it.future.done() or (it.deadline_ns is not None and now >= it.deadline_ns):
                    return None
            # The loop counts this instance as executing until _finished; the others are the rest.
            items, _ = self._take(now, self._executing - 1)
            return items

    @staticmethod
    def _execute(runner: Any, items: list[_Item]) -> tuple[list[dict[str, np.ndarray]], int, int, int]:
        t0 = time.perf_counter_ns()
        if len(items) == 1:
            feed = items[0].feed
        else:
            feed = {k: np.concatenate([it.feed[k] for it in items]) for k in items[0].feed}
        t1 = time.perf_counter_ns()
        out = runner.infer(feed)
        t2 = time.perf_counter_ns()
        if len(items) == 1:
            results = [out]
        else:
            results, pos = [], 0
            for it in items:
                results.append({k: v[pos:pos + it.batch] for k, v in out.items()})
                pos += it.batch
        t3 = time.perf_counter_ns()
        return results, t1 - t0, t2 - t1, t3 - t2

    # -- completion (event loop) -----------------------------------------------------------------------
    def _finished(self, result: Any, exc: BaseException | None, runner: Any, items: list[_Item], start_ns: int,
                  kept: bool = False) -> None:
        """An execution ended (on the loop). ``kept``: its thread already runs the next batch with the runner."""
        if not kept:
            self._free.append(runner)
            self._executing -= 1
        self.stats.pending -= len(items)
        self._last_requests = len(items)
        if exc is None:
            results, in_ns, infer_ns, out_ns = result
            size = sum(it.batch for it in items)
            if len(items) == 1:
                self._inline_ewma_ns = (self._inline_ewma_ns * 7 + in_ns + infer_ns + out_ns) // 8
            self.stats.record_execution(size, in_ns, infer_ns, out_ns)
            rec = ExecutionRecord(len(items), size, in_ns, infer_ns, out_ns)
            self.executions.append(rec)
            if self.on_execution:
                self.on_execution(rec)
            for it, res in zip(items, results):
                self.stats.record_request_compute(start_ns - it.enqueued_ns, in_ns, infer_ns, out_ns)
                if not it.future.done():
                    it.future.set_result(res)
        else:
            if isinstance(exc, ServeError):
                err: Exception = exc
            elif isinstance(exc, RunnerError):
                err = BadRequest(f"model '{self.name}': {exc}")
            else:
                err = ServeError(f"model '{self.name}' failed to execute a batch of {len(items)} requests: "
                                 f"{type(exc).__name__}: {exc}")
            for it in items:
                if not it.future.done():
                    it.future.set_exception(err)
        if not self._closed:
            self._dispatch()
        self._check_idle()


__all__ = ["BatcherConfig", "Done", "DynamicBatcher", "ExecutionRecord", "awaited"]
