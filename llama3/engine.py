"""The server's driver of the decoding core: one thread steps the ``Scheduler``, asyncio handlers get ``Delta``s.

Everything about choosing tokens, batching, prefill chunks and the prefix cache lives in ``scheduler`` and
``sequence``; this module only owns the thread, the bounded waiting room, cancellation from other threads,
graceful draining, and the hand-over of each sequence's new text to the event loop that consumes it (one
``asyncio.Queue`` per submission, fed with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from .errors import GenerationError, Llama3Error, ParallelError
from .model import Transformer
from .parallel import lockstep
from .parallel.world import World
from .scheduler import Scheduler
from .sequence import GenerationSpec, TokenLogprob
from .sequence import Sequence as Generation
from .tokenizer import Tokenizer

log = logging.getLogger("llama3.engine")
T = TypeVar("T")

__all__ = ["Delta", "Engine", "EngineClosedError", "GenerationSpec", "QueueFullError", "Submission", "TokenLogprob"]


class QueueFullError(Llama3Error):
    """Every slot is busy and the waiting queue is full: the caller should retry later."""


class EngineClosedError(Llama3Error):
    """The engine has been stopped."""


@dataclass
class Delta:
    """What one sequence produced since its previous Delta; the last one has ``finish_reason`` set.

    ``finish_reason`` is "stop" (stop token or string), "length", "cancelled" or "error" (then ``error`` says
    why and ``error_kind`` whose fault it was: "request" for a ``GenerationError`` the request's values caused,
    "shutdown" when the server stopped before the sequence finished, "server" for anything else).
    ``completion_tokens`` is the number of tokens generated so far (a final stop token not counted).
    """

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None


class EngineObserver(Protocol):
    """Receives token timings from the engine's thread (``llama3.server.metrics`` implements it)."""

    def first_token(self, seconds: float) -> None:
        """A sequence's first token, ``seconds`` after its submission."""

    def next_tokens(self, count: int, seconds: float) -> None:
        """``count`` more tokens of a sequence, ``seconds`` after its previous ones."""

    def finished(self, reason: str, seconds: float) -> None:
        """A sequence ended (``finish_reason``), ``seconds`` after its submission."""


@dataclass
class _Timing:
    submitted: float
    last: float
    tokens: int = 0


class Submission:
    """Handle of sequences submitted together (the ``n`` choices of one request, or its several prompts).

    ``async for index, delta in submission.events()`` yields each sequence's Deltas, tagged with its index,
    until every sequence has sent its final Delta. ``cancel()`` (from any thread) makes the engine drop the
    sequences at its next step and free their slots; they then end with finish_reason "cancelled".
    """

    def __init__(self, engine: Engine, sequences: list[Generation], loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop, self.sequences = engine, loop, sequences
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.cancelled = False
        self.done = False  # every final Delta has been read

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.engine.cancel(self.sequences)

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        remaining = len(self.sequences)
        while remaining:
            index, delta = await self.queue.get()
            remaining -= delta.finish_reason is not None
            self.done = remaining == 0
            yield index, delta

    def put(self, index: int, delta: Delta) -> None:
        """Hand a Delta to the consuming event loop (from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, delta))
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.cancel()


class Engine:
    """Continuous-batching generator over a loaded model: ``start()``, then ``submit()`` from an event loop.

    At most ``max_batch_size`` sequences decode together; up to ``max_queue`` more wait for a slot, and
    beyond that ``submit`` raises ``QueueFullError``. Context per sequence: ``max_seq_len`` tokens.
    ``threads`` sets torch's CPU threads for the engine thread (None: torch's default).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        max_queue: int = 512,
        seed: int | None = None,
        threads: int | None = None,
        prefix_cache: bool = True,
        prompt_lookup: int = 0,
        observer: EngineObserver | None = None,
        world: World | None = None,
    ) -> None:
        if max_queue < 0:
            raise GenerationError(f"invalid engine limits: max_queue={max_queue} (>= 0)")
        self.scheduler = Scheduler(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                   prefix_cache=prefix_cache, prompt_lookup=prompt_lookup)
        self.model, self.tokenizer, self.threads = model, tokenizer, threads
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.stop_tokens = frozenset(tokenizer.stop_tokens)
        self._seeds = random.Random(seed)  # seeds of requests that bring none
        self._cond = threading.Condition()
        self._incoming: list[Generation] = []  # submitted, not yet handed to the scheduler
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): no admissions, then end what is left
        self.observer = observer
        self._timings: dict[int, _Timing] = {}  # id(sequence) -> its clock, while an observer listens
        # Rank 0 of a tensor-parallel job: each step's admissions and cancellations are broadcast first
        # (``llama3.parallel.lockstep``), so cancellations wait for a step boundary instead of landing mid-step.
        self.world = world
        self._cancels: list[Generation] = []
        self._seed_of: dict[int, int] = {}  # id(sequence) -> its seed, until broadcast
        self.failure: str | None = None  # why the engine stopped on its own (a tensor-parallel rank was lost)
        self.on_failure: Callable[[str], None] | None = None
        # Work for the engine thread that is not a sequence (an embedding pass over the served model): run
        # between steps, so it never races the decoding core for the model or its KV cache.
        self._jobs: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []

    # -- public, called from other threads -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama3-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; sequences still waiting or running end with finish_reason "error"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all()

    def drain(self, grace_s: float) -> None:
        """Begin a graceful shutdown: refuse new work now, let running and waiting sequences go on for
        ``grace_s`` seconds, then end those still unfinished with an error ("the server is shutting down")."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + max(0.0, grace_s)
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (False before start(), after stop() or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def call(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``job()`` on the engine thread before its next step; await the result (or its exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineClosedError("the generation engine is not running")
            if self.world is not None:
                raise GenerationError("this server runs a tensor-parallel model: it cannot run other work on it")
            self._jobs.append((job, future))
            self._cond.notify_all()
        return asyncio.wrap_future(future)

    def cancel(self, seqs: Sequence[Generation]) -> None:
        """Drop ``seqs`` at the next step (from any thread)."""
        with self._cond:
            if self.world is None:
                for seq in seqs:
                    seq.cancel()
            else:
                self._cancels.extend(seqs)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            stats = self.scheduler.stats()
            stats["waiting"] += sum(not s.cancelled for s in self._incoming)
        return {**stats, "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                "context_length": self.max_seq_len}

    def submit(self, specs: Sequence[GenerationSpec]) -> Submission:
        """Queue sequences (all or none) for generation; call from the event loop that will consume them."""
        if not specs:
            raise GenerationError("nothing to generate")
        if len(specs) > self.max_batch_size + self.max_queue:
            raise GenerationError(
                f"{len(specs)} sequences in one request can never fit: at most {self.max_batch_size + self.max_queue} "
                f"(max-batch-size {self.max_batch_size} + max-queue {self.max_queue})"
            )
        seqs, seeds = [], []
        for spec in specs:
            seed = spec.params.seed if spec.params.seed is not None else self._seeds.getrandbits(63)
            seq = Generation(spec, self.tokenizer, torch.Generator(self.device).manual_seed(seed), self.stop_tokens)
            self.scheduler.check(seq)
            seqs.append(seq)
            seeds.append(seed)
        submission = Submission(self, seqs, asyncio.get_running_loop())
        for index, seq in enumerate(seqs):
            seq.tag = (submission, index)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineClosedError("the generation engine is not running")
            if self._drain_deadline is not None:
                raise EngineClosedError("the server is shutting down and accepts no new requests")
            running = len(self.scheduler.running)
            waiting = sum(not s.cancelled for s in (*self.scheduler.waiting, *self._incoming))
            # Waiting sequences first fill the free slots; up to max_queue more may wait behind them.
            if waiting + len(seqs) > max(0, self.max_batch_size - running) + self.max_queue:
                raise QueueFullError(
                    f"server busy: {running} sequences generating (max-batch-size {self.max_batch_size}) and "
                    f"{waiting} waiting (max-queue {self.max_queue}); retry later"
                )
            self._incoming.extend(seqs)
            if self.world is not None:
                self._seed_of.update((id(seq), seed) for seq, seed in zip(seqs, seeds))
            if self.observer is not None:
                start = time.monotonic()
                for seq in seqs:
                    self._timings[id(seq)] = _Timing(start, start)
            self._cond.notify_all()
        return submission

    # -- the loop, on the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # CPU intra-op threads; set on this thread, which runs the ops
        try:
            with torch.inference_mode():
                while self._turn():
                    pass
        except ParallelError as exc:
            self._fail(str(exc))

    def _turn(self) -> bool:
        """Wait for work, hand it to the scheduler (and the other ranks), run one step; False to stop."""
        orders = None
        with self._cond:
            idle = self.world is not None and lockstep.heartbeat_s(self.world)
            while (not self._stopping and not self._incoming and not self.scheduler.busy and not self._cancels
                   and not self._jobs):
                if not self._cond.wait(timeout=idle or None) and idle:
                    break  # idle past the heartbeat: tell the other ranks we are alive
            end_all = (self._drain_deadline is not None and time.monotonic() >= self._drain_deadline
                       and not self._stopping)
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, []
            jobs, self._jobs = self._jobs, []
            if self.world is not None:
                orders = lockstep.Orders(
                    add=[(id(seq), seq.spec, self._seed_of.pop(id(seq))) for seq in incoming],
                    cancel=[id(seq) for seq in cancels],
                    end_all=("the server is shutting down", "shutdown") if end_all else None,
                    stop=self._stopping,
                )
        if orders is not None:
            self.world.broadcast(orders)
        if self._stopping:
            self._incoming[:0] = incoming  # stop() ends them
            self._jobs[:0] = jobs
            return False
        for job, future in jobs:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, as a thread pool does
                    future.set_exception(exc)
        self.scheduler.waiting.extend(incoming)  # checked in submit()
        for seq in cancels:
            seq.cancel()
        if end_all:
            self._end_all()
        elif self.scheduler.busy:
            for seq in self.scheduler.step():
                self._emit(seq)
        return True

    def _fail(self, message: str) -> None:
        """The tensor-parallel job broke: end everything with ``message`` and stop serving."""
        log.error("%s", message)
        with self._cond:
            self.failure = message
            self._stopping = True
        ended = self.scheduler.end_all(message, "server")
        with self._cond:
            for seq in self._incoming:
                seq.fail(message, "server")
            ended += self._incoming
            self._incoming = []
        for seq in ended:
            self._emit(seq)
        if self.on_failure is not None:
            self.on_failure(message)

    def _end_all(self) -> None:
        """End every waiting and running sequence (and pending job) with the shutdown error."""
        with self._cond:
            for _, future in self._jobs:
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineClosedError("the server is shutting down"))
            self._jobs = []
            ended = self.scheduler.end_all("the server is shutting down", "shutdown")
            for seq in self._incoming:
                seq.fail("the server is shutting down", "shutdown")
            ended += self._incoming
            self._incoming = []
        for seq in ended:
            self._emit(seq)

    def _emit(self, seq: Generation) -> None:
        if self.observer is not None:
            self._observe(seq)
        submission, index = seq.tag
        text, entries = seq.take_delta()
        if text or entries or seq.done:
            submission.put(index, Delta(
                text=text, logprobs=entries, finish_reason=seq.finish_reason,
                completion_tokens=len(seq.generated), error=seq.error, error_kind=seq.error_kind,
            ))  # fmt: skip

    def _observe(self, seq: Generation) -> None:
        with self._cond:
            timing = self._timings.pop(id(seq), None) if seq.done else self._timings.get(id(seq))
        if timing is None:  # submitted before the observer was set
            return
        now, count = time.monotonic(), len(seq.generated)
        try:
            if count > timing.tokens:
                if timing.tokens == 0:
                    self.observer.first_token(now - timing.submitted)
                    if count > 1:
                        self.observer.next_tokens(count - 1, now - timing.submitted)
                else:
                    self.observer.next_tokens(count - timing.tokens, now - timing.last)
                timing.tokens, timing.last = count, now
            if seq.done:
                self.observer.finished(seq.finish_reason or "error", now - timing.submitted)
        except Exception:  # noqa: BLE001 - metrics must never stop generation
            log.exception("engine observer failed")
