"""The engine on its own thread, with an asyncio stream of outputs per request.

The event loop never waits on a forward pass: callers hand commands to the
engine thread through a queue and read outputs from an asyncio.Queue that the
thread fills with `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from leanserve.engine.engine_config import EngineConfig
from leanserve.engine.llm_engine import LLMEngine
from leanserve.engine.outputs import RequestOutput
from leanserve.params import SamplingParams

log = logging.getLogger("leanserve.engine")

IDLE_POLL_SECONDS = 0.5
_ACCEPTED = object()     # the first item of a stream: the engine took the request


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, config: EngineConfig, on_step: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.engine: LLMEngine | None = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.heartbeat = time.monotonic()     # last time the engine loop went round
        self.started_at = time.time()
        self.on_step = on_step                # called with the tokens each step computed
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="leanserve-engine", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The engine is loaded and its loop keeps going round."""
        return (self.ready.is_set() and self.engine is not None and self._thread.is_alive()
                and time.monotonic() - self.heartbeat < 60.0)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the scheduler's queue plus commands on their way to it."""
        return (len(self.engine.scheduler.waiting) if self.engine else 0) + self._commands.qsize()

    # ---- requests ----------------------------------------------------------------------------

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     prompt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Queue a request and, once the engine thread has accepted it, return the stream of its outputs;
        ValueError if it cannot be served (the engine validates it, once, as it takes it).

        Closing the stream before the request finishes aborts it in the engine.
        """
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, prompt_token_ids, params, prompt, priority))
        try:
            accepted = await stream.get()
        except asyncio.CancelledError:          # the caller went away while the engine finished a step
            self._streams.pop(request_id, None)
            self.abort(request_id)
            raise
        if isinstance(accepted, BaseException):
            self._streams.pop(request_id, None)
            raise accepted
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)           # nothing more is delivered to it
        self._commands.put(("abort", request_id))

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = LLMEngine(self.config)
        except BaseException as e:  # noqa: BLE001 - reported through load_error and /health
            log.exception("loading the model failed")
            self.load_error = e
            self.ready.set()
            return
        # What is alive now (the model, the tokenizer, the server) lives as long as the process:
        # frozen, the garbage collector's full passes no longer walk it while a step waits.
        gc.collect()
        gc.freeze()
        self.ready.set()
        engine = self.engine
        while not self._stopping:
            self.heartbeat = time.monotonic()
            self._apply_commands(block=not engine.has_unfinished_requests())
            if not engine.has_unfinished_requests():
                continue
            before = engine.scheduler.num_computed_tokens
            outputs = engine.step()
            if self.on_step is not None:
                self.on_step(engine.scheduler.num_computed_tokens - before)
            self._deliver_all([(output.request_id, output) for output in outputs])
        gc.unfreeze()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_POLL_SECONDS) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if command[0] == "add":
                _, request_id, token_ids, params, prompt, priority = command
                try:
                    self.engine.add_request(request_id, token_ids, params, priority=priority, prompt_text=prompt)
                    self._deliver(request_id, _ACCEPTED)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine thread
                    self._deliver(request_id, e)
            elif command[0] == "abort":
                self.engine.abort_request(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """(request id, output or error) pairs: one wake-up of each event loop for all of them."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:                      # that event loop is closed: nobody reads these streams
                for request_id, _ in items:
                    if self._streams.get(request_id, (None,))[0] is loop:
                        self._streams.pop(request_id, None)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
