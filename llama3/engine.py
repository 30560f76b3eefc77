"""Continuous batching: one thread owns the model and decodes every running sequence together.

A sequence is admitted into a free KV-cache slot; its prompt is prefilled into that slot alone, in fixed-size
chunks interleaved with the decode steps of the others; then it joins the batched decode step, where every row
sits at its own position. It leaves the batch as soon as it finishes, is cancelled or fails, and the next waiting
sequence takes its slot. Text is produced here too, so stop strings end a sequence at the step they appear and
the held-back text of a possible stop string never leaks.

Reproducibility: each sequence samples with its own ``torch.Generator`` (seeded from the request's seed, or from
the engine's seed source when it has none), and each prompt is prefilled alone; so a seeded sequence draws the
same numbers whatever else is running. Its decode logits come from batches whose size changes as others come
and go, and CPU matmuls round differently for different batch sizes (~1e-5 on logits of ~20), so a token could
in principle flip at a near-tie; tests pin that outputs stay identical on the default model.

Results reach asyncio consumers through one ``asyncio.Queue`` per submission, fed with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .errors import GenerationError, Llama3Error
from .generation import StopStringWatch
from .model import Transformer
from .sampling import SamplingParams, apply_logit_bias, apply_penalties, choose
from .tokenizer import Tokenizer

log = logging.getLogger("llama3.engine")

# Prompts are prefilled in chunks at fixed offsets (so a prompt's numbers never depend on other requests), and
# each loop iteration prefills at most PREFILL_TOKENS_PER_STEP tokens (at least one chunk) before the next
# decode step: a long prompt arriving cannot stall the streams already running for its whole prefill.
PREFILL_CHUNK = 256
PREFILL_TOKENS_PER_STEP = 256


class QueueFullError(Llama3Error):
    """Every slot is busy and the waiting queue is full: the caller should retry later."""


class EngineClosedError(Llama3Error):
    """The engine has been stopped."""


@dataclass(frozen=True)
class GenerationSpec:
    """One sequence to generate: prompt ids, token budget, sampling, stop strings and logprob options.

    ``top_logprobs`` alternatives are reported with each token when ``logprobs`` is on; log-probabilities are
    those of the model's raw distribution (before penalties, bias and temperature), as vLLM reports them.
    """

    prompt: Sequence[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    """A generated token: its id, the text it added to the output, its logprob and the top alternatives."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, float]]


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


class Submission:
    """Handle of sequences submitted together (the ``n`` choices of one request, or its several prompts).

    ``async for index, delta in submission.events()`` yields each sequence's Deltas, tagged with its index,
    until every sequence has sent its final Delta. ``cancel()`` (from any thread) makes the engine drop the
    sequences at its next step and free their slots; they then end with finish_reason "cancelled".
    """

    def __init__(self, engine: Engine, specs: Sequence[GenerationSpec], loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.sequences = [_Sequence(self, i, spec) for i, spec in enumerate(specs)]
        self.cancelled = False
        self.done = False  # every final Delta has been read

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.engine.wake()

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        remaining = len(self.sequences)
        while remaining:
            index, delta = await self.queue.get()
            remaining -= delta.finish_reason is not None
            self.done = remaining == 0
            yield index, delta


class _Sequence:
    """One sequence of a Submission, as the engine sees it."""

    def __init__(self, submission: Submission, index: int, spec: GenerationSpec) -> None:
        self.submission, self.index, self.spec = submission, index, spec

    @property
    def cancelled(self) -> bool:
        return self.submission.cancelled

    def _put(self, delta: Delta) -> None:
        try:
            self.submission.loop.call_soon_threadsafe(self.submission.queue.put_nowait, (self.index, delta))
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.submission.cancelled = True


@dataclass
class _Running:
    """Engine-side state of a sequence that holds a slot."""

    stream: _Sequence
    slot: int
    watch: StopStringWatch
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    position: int = 0  # prompt tokens in the cache while prefilling; then where ``last`` goes on the next step
    ready: bool = False  # prefilled and holding its first token: it takes part in decode steps
    last: int = 0
    output_counts: torch.Tensor | None = None  # (V,) for presence/frequency/repetition penalties
    prompt_mask: torch.Tensor | None = None  # (V,) for the repetition penalty
    shown: int = 0  # characters of output text already sent
    pending: list[tuple[int, TokenLogprob]] = field(default_factory=list)  # (char end, entry) not yet sent


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
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or max_seq_len < 2:
            raise GenerationError(
                f"invalid engine limits: max_batch_size={max_batch_size} (>= 1), max_queue={max_queue} (>= 0), "
                f"max_seq_len={max_seq_len} (>= 2)"
            )
        if max_seq_len > model.config.max_seq_len:
            raise GenerationError(
                f"max_seq_len={max_seq_len} exceeds the model's context length {model.config.max_seq_len}"
            )
        self.model, self.tokenizer, self.threads = model, tokenizer, threads
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        if model.cache_batch != max_batch_size or model.cache_len != max_seq_len:
            model.setup_cache(max_batch_size, max_seq_len)
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.stop_tokens = frozenset(tokenizer.stop_tokens)
        self._seeds = random.Random(seed)  # seeds of requests that bring none
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Running] = {}  # slot -> sequence
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): no admissions, then end what is left
        self.steps = 0  # decode steps run (for stats and tests)
        self.generated_tokens = 0

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

    def _end_all(self) -> None:
        """End every waiting and running sequence with the shutdown error (engine thread, or after it stopped)."""
        with self._cond:
            streams = [*self._waiting, *(r.stream for r in self._running.values())]
            self._waiting.clear()
            self._running.clear()
        for stream in streams:
            stream._put(Delta(finish_reason="error", error="the server is shutting down", error_kind="shutdown"))

    def submit(self, specs: Sequence[GenerationSpec]) -> Submission:
        """Queue sequences (all or none) for generation; call from the event loop that will consume them."""
        if not specs:
            raise GenerationError("nothing to generate")
        if len(specs) > self.max_batch_size + self.max_queue:
            raise GenerationError(
                f"{len(specs)} sequences in one request can never fit: at most {self.max_batch_size + self.max_queue} "
                f"(max-batch-size {self.max_batch_size} + max-queue {self.max_queue})"
            )
        for spec in specs:
            self._check(spec)
        submission = Submission(self, specs, asyncio.get_running_loop())
        streams = submission.sequences
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineClosedError("the generation engine is not running")
            if self._drain_deadline is not None:
                raise EngineClosedError("the server is shutting down and accepts no new requests")
            waiting = sum(not s.cancelled for s in self._waiting)
            free = self.max_batch_size - len(self._running)
            # Waiting sequences first fill the free slots; up to max_queue more may wait behind them.
            if waiting + len(streams) > max(0, free) + self.max_queue:
                raise QueueFullError(
                    f"server busy: {len(self._running)} sequences generating (max-batch-size "
                    f"{self.max_batch_size}) and {waiting} waiting (max-queue {self.max_queue}); retry later"
                )
            self._waiting.extend(streams)
            self._cond.notify_all()
        return submission

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (False before start(), after stop() or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": sum(not s.cancelled for s in self._waiting),
                "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue,
                "context_length": self.max_seq_len,
                "decode_steps": self.steps,
                "generated_tokens": self.generated_tokens,
            }

    def _check(self, spec: GenerationSpec) -> None:
        n = len(spec.prompt)
        if n == 0:
            raise GenerationError("the prompt is empty")
        if n >= self.max_seq_len:
            raise GenerationError(
                f"the prompt has {n} tokens but the context is {self.max_seq_len} tokens, "
                "which leaves no room to generate"
            )
        if any(not 0 <= t < self.vocab_size for t in spec.prompt):
            raise GenerationError(f"the prompt contains token ids outside the vocabulary [0, {self.vocab_size})")
        if spec.max_tokens < 1 or n + spec.max_tokens > self.max_seq_len:
            raise GenerationError(
                f"max_tokens={spec.max_tokens} must be >= 1 and at most {self.max_seq_len - n} "
                f"(context {self.max_seq_len} minus the prompt's {n} tokens)"
            )

    # -- the loop, on the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # CPU intra-op threads; set on this thread, which runs the ops
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cond.wait()  # idle: nothing for a drain deadline to end
                    if self._stopping:
                        return
                    if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                        self._end_all()
                        continue
                    for stream in [s for s in self._waiting if s.cancelled]:
                        self._waiting.remove(stream)
                        stream._put(Delta(finish_reason="cancelled"))
                    admitted = []
                    free = [s for s in range(self.max_batch_size) if s not in self._running]
                    while self._waiting and len(admitted) < len(free):
                        # Reserved under the lock, so submit() never counts a sequence being admitted as room.
                        admitted.append(self._reserve(free[len(admitted)], self._waiting.popleft()))
                if admitted:
                    log.debug("admitted %d sequences into slots %s", len(admitted), [r.slot for r in admitted])
                self._prefill_some()
                self._drop_cancelled()
                if any(r.ready for r in self._running.values()):
                    self._guard([r.stream for r in self._running.values() if r.ready], self._decode_step)

    def _guard(self, streams: list[_Sequence], work) -> None:
        """Run ``work``; on an error fail only the sequences involved and keep serving."""
        try:
            work()
        except GenerationError as exc:  # the request's own values (e.g. every token forbidden): its fault alone
            self._fail(streams, str(exc), "request")
        except Exception as exc:  # noqa: BLE001 - the engine must survive any single failure
            log.exception("generation failed")
            self._fail(streams, f"generation failed: {type(exc).__name__}: {exc}", "server")

    def _fail(self, streams: list[_Sequence], message: str, kind: str) -> None:
        for stream in streams:
            for slot, running in list(self._running.items()):
                if running.stream is stream:
                    del self._running[slot]
            stream._put(Delta(finish_reason="error", error=message, error_kind=kind))

    def _drop_cancelled(self) -> None:
        for slot, running in list(self._running.items()):
            if running.stream.cancelled:
                del self._running[slot]
                running.stream._put(Delta(finish_reason="cancelled", completion_tokens=len(running.generated)))

    def _reserve(self, slot: int, stream: _Sequence) -> _Running:
        spec = stream.spec
        seed = spec.params.seed if spec.params.seed is not None else self._seeds.getrandbits(63)
        running = _Running(
            stream=stream,
            slot=slot,
            watch=StopStringWatch(self.tokenizer, list(spec.stop), skip_special=True),
            generator=torch.Generator(self.device).manual_seed(seed),
        )
        self._running[slot] = running
        return running

    def _prefill_some(self) -> None:
        """Prefill waiting prompts, oldest first, chunk by chunk, within this iteration's token budget."""
        budget = PREFILL_TOKENS_PER_STEP
        for running in [r for r in self._running.values() if not r.ready]:  # dicts keep admission order
            while budget > 0 and not running.ready and self._running.get(running.slot) is running:
                start = running.position
                size = min(PREFILL_CHUNK, len(running.stream.spec.prompt) - start)
                budget -= size
                self._guard([running.stream], partial(self._prefill_chunk, running, start, size))
            if budget <= 0:
                return

    def _prefill_chunk(self, running: _Running, start: int, size: int) -> None:
        spec = running.stream.spec
        if start == 0 and spec.params.needs_history:
            prompt = torch.tensor(list(spec.prompt), dtype=torch.long, device=self.device)
            running.output_counts = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)
            running.prompt_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            running.prompt_mask[prompt] = True
        chunk = torch.tensor([list(spec.prompt[start : start + size])], dtype=torch.long, device=self.device)
        rows = torch.tensor([running.slot], device=self.device)
        # Into its own slot, alone: the numbers never depend on what else is running.
        logits = self.model(chunk, start, last_only=True, cache_rows=rows)[0, -1]
        running.position = start + size
        if running.position == len(spec.prompt):
            running.ready = True
            self._accept(running, logits)

    def _decode_step(self) -> None:
        # Rows 0..highest busy slot run together: a contiguous range lets the KV cache hand out views instead
        # of gathering rows; idle slots inside it compute a throwaway row (their cache is rewritten on admit).
        # A slot still prefilling computes its throwaway row at its next prompt position, which its next
        # chunk overwrites; idle slots use position 0.
        width = max(self._running) + 1
        tokens = torch.zeros(width, 1, dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        for slot, running in self._running.items():
            tokens[slot, 0] = running.last
            positions[slot] = running.position
        kv_len = int(positions.max()) + 1
        logits = self.model(tokens.to(self.device), positions.to(self.device), last_only=True, kv_len=kv_len)
        self.steps += 1
        for slot, running in list(self._running.items()):
            if running.ready:
                running.position += 1
                # One sequence's failure (its sampling values, its processors) must end that sequence alone.
                self._guard([running.stream], partial(self._accept, running, logits[slot, -1]))

    def _accept(self, running: _Running, logits: torch.Tensor) -> None:
        """Choose the next token of one sequence from its (V,) logits, then emit text and maybe finish."""
        spec, params = running.stream.spec, running.stream.spec.params
        row = logits[None]
        if params.needs_history:
            row = apply_penalties(row, params, running.prompt_mask[None], running.output_counts[None])
        row = apply_logit_bias(row, params.logit_bias)
        token = int(choose(row, params, running.generator)[0])
        finish = None
        if token in self.stop_tokens:
            finish = "stop"
        else:
            running.generated.append(token)
            running.last = token
            self.generated_tokens += 1
            if running.output_counts is not None:
                running.output_counts[token] += 1
            before = len(running.watch.text)
            if running.watch.push(token):
                finish = "stop"  # the stop string is cut; this token's text is not part of the output
            else:
                if spec.logprobs:
                    entry = self._logprob(logits, token, running.watch.text[before:], spec.top_logprobs)
                    running.pending.append((len(running.watch.text), entry))
                if len(running.generated) >= spec.max_tokens:
                    finish = "length"
        self._emit(running, finish)

    def _logprob(self, logits: torch.Tensor, token: int, text: str, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        alternatives: list[tuple[int, float]] = []
        if top > 0:
            values, ids = torch.topk(logp, top)
            alternatives = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token=token, text=text, logprob=float(logp[token]), top=alternatives)

    def _emit(self, running: _Running, finish: str | None) -> None:
        watch = running.watch
        if finish is not None:
            watch.finish()
            del self._running[running.slot]
        text = watch.releasable(final=finish is not None)
        # Logprob entries go out with the text they produced; after a stop string only whole tokens before it.
        limit = len(text) if (finish is None or watch.cut is not None) else None
        ready = [e for end, e in running.pending if limit is None or end <= limit]
        running.pending = running.pending[len(ready) :] if finish is None else []
        delta = Delta(
            text=text[running.shown :],
            logprobs=ready,
            finish_reason=finish,
            completion_tokens=len(running.generated),
        )
        running.shown = len(text)
        if delta.text or delta.logprobs or finish is not None:
            running.stream._put(delta)
