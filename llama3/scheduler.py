"""The decoding core: one synchronous ``step()`` over the KV-cache slots, for every front end.

A sequence added with ``add`` waits for a free slot (one row of the model's KV cache). Admitted, its prompt
is prefilled into that slot alone, in chunks at fixed offsets (0, CHUNK, 2 CHUNK ...), at most
``tokens_per_step`` prompt tokens per step so that a long prompt never stalls the running streams; then it joins
the batched decode step, where every row sits at its own position. It leaves as soon as it finishes, is
cancelled or fails, and the next waiting sequence takes the slot. Drivers: ``Llama`` (Meta's API, ShopBench,
``llama3 bench``) steps it in the caller's thread, ``Engine`` (the server) in its own thread.

Reproducibility: each sequence samples with its own generator, and each prompt is prefilled alone in chunks
whose size and offsets never depend on other sequences; so a seeded sequence draws the same tokens whatever
else runs (decode rows are batch-invariant on the quantized CPU kernels; float GEMMs may round differently
per batch size, ~1e-5 on logits).

Prefix cache: a free slot keeps the keys and values of the whole chunks it prefilled. A new sequence whose
prompt starts with those tokens (the previous turn of a chat, a shared system prompt or few-shot block) takes
that slot and prefills only the rest. Only whole chunks computed by prefill at the same offsets are reused,
so a hit gives exactly the numbers of a cold prefill; decode-written positions and partial chunks are
recomputed. Without a hit, the least recently used free slot is taken. Before each prefill chunk, whole chunks
that another slot holds (running or free) are copied instead of computed, so prompts admitted together reuse
the prefix the first of them prefilled. A prompt that declares a shared prefix
(``GenerationSpec.shared_prefix``: a system turn, few-shot examples, shorter than a chunk) is chunked at
0, CHUNK, ... up to that prefix's end, and from there on at its end + k CHUNK: the prefix's last chunk ends
exactly there, so every prompt declaring the same prefix reuses it, and the chunk offsets (hence the numbers)
of a hit are still those of a cold prefill of the same prompt.

Prompt lookup (``prompt_lookup`` > 0, off by default): a decode step also feeds each sequence's draft, the
tokens that followed the last earlier occurrence of its latest n-gram (``llama3.lookup``), as extra rows at the
next positions of the same cache row. ``Sequence.accept`` then takes the step's logits one position after
another and stops at the first token that differs from the draft. Each logit it sees is the one plain decoding
would compute at that point: bit for bit on the quantized CPU kernels, which compute each row alone whatever
else shares the step, so the tokens, sampled ones included, are plain decoding's and only the number of steps
drops; up to float rounding elsewhere (attention over a longer key range rounds differently, as batching
does). Keys and values written for rejected draft positions lie beyond the sequence's position and are
overwritten before any read.

Option scoring (``GenerationSpec.options``): the prompt is prefilled as above, prefix cache included; then
every option is a branch of that cache row in one batched forward (``Transformer.branches``: a scratch copy of
the prompt's keys and values per branch) and the sequence ends with each option's token logprobs, without a
decode step.

LoRA adapters: each sequence runs with its own (``GenerationSpec.adapter``, else the model's engaged one), rows
of one decode step with different adapters alike; a slot's cached chunks are reused only by a sequence with
the adapter that computed them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import GenerationError, ParallelError
from .lookup import PromptLookup
from .model import Transformer
from .sequence import Sequence, check_prompt

log = logging.getLogger("llama3.scheduler")

PREFILL_CHUNK = 256
PREFILL_TOKENS_PER_STEP = 256
# Most rows (real inputs + drafts) in one speculative decode step. Up to this many rows the quantized CPU
# kernels stream each weight once for all rows (llama3.quant.native.FUSED_MAX_ROWS), so drafts cost little,
# and the output head keeps computing every row alone, which the exactness above relies on.
LOOKUP_MAX_ROWS = 32
# Most scratch KV-cache bytes the branches of one option-scoring pass may take (more options run in more passes).
BRANCH_BYTES = 256 << 20


@dataclass
class _Slot:
    """One KV-cache row: the sequence in it, and the prompt tokens whose prefilled chunks it still holds."""

    cached: list[int] = field(default_factory=list)  # tokens of whole prefilled chunks at positions 0..len-1
    bounds: list[int] = field(default_factory=list)  # where those chunks end (the last is len(cached))
    cached_adapter: str | None = None  # the LoRA adapter those chunks were computed with
    last_used: int = 0  # when its last sequence left (least recently used free slots are overwritten first)
    admitted: int = 0  # when its sequence came in (older prompts are prefilled first)
    seq: Sequence | None = None
    position: int = 0  # prompt tokens in the cache while prefilling; then where ``last`` goes next step
    ready: bool = False  # prefilled and holding its first token: takes part in decode steps
    last: int = 0
    lookup: PromptLookup | None = None  # the sequence's draft source, with prompt lookup on
    draft_len: int = 0  # how many draft tokens to ask for next (adapts to how many were accepted)


class Scheduler:
    """Continuous batching over ``model``'s KV cache (``max_batch_size`` slots of ``max_seq_len`` positions).

    ``add(seq)`` queues a sequence; ``step()`` admits, prefills within the step's budget, runs one batched
    decode step and returns the sequences that changed (a new token, or finished). Not thread-safe: one
    thread steps it (``add`` and ``Sequence.cancel`` may be called from others under the caller's lock).
    """

    def __init__(
        self, model: Transformer, *, max_batch_size: int, max_seq_len: int, prefix_cache: bool = True,
        chunk: int | None = None, tokens_per_step: int | None = None, prompt_lookup: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 2:
            raise GenerationError(f"invalid limits: max_batch_size={max_batch_size} (>= 1), max_seq_len={max_seq_len} (>= 2)")
        if max_seq_len > model.config.max_seq_len:
            raise GenerationError(f"max_seq_len={max_seq_len} exceeds the model's context length {model.config.max_seq_len}")
        self.model, self.max_batch_size, self.max_seq_len = model, max_batch_size, max_seq_len
        self.prefix_cache = prefix_cache
        if prompt_lookup < 0:
            raise GenerationError(f"prompt_lookup={prompt_lookup} must be >= 0 (draft tokens per step; 0 = off)")
        self.prompt_lookup = prompt_lookup
        self.chunk = chunk or PREFILL_CHUNK
        self.tokens_per_step = tokens_per_step or PREFILL_TOKENS_PER_STEP
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.slots = [_Slot() for _ in range(max_batch_size)]
        self.waiting: deque[Sequence] = deque()
        self._clock = 0
        self.steps = 0  # decode steps run
        self.generated_tokens = 0
        self.prompt_tokens = 0  # prompt tokens of admitted sequences
        self.prefix_hits = 0  # admissions that reused cached chunks
        self.prefix_tokens = 0  # prompt tokens not prefilled thanks to the cache
        self.draft_tokens = 0  # prompt-lookup draft tokens fed to decode steps
        self.accepted_draft_tokens = 0  # of which the model's own choice matched
        self.claim()

    def _adapter(self, seq: Sequence) -> str | None:
        router = getattr(self.model, "adapters", None)
        if router is None:
            return None
        return seq.spec.adapter if seq.spec.adapter is not None else router.active

    @contextmanager
    def _route(self, rows: list[Sequence | None]) -> Iterator[None]:
        """Run the block's forward with each row's adapter (rows without a sequence: none)."""
        router = getattr(self.model, "adapters", None)
        if router is None:
            yield
            return
        saved = router.rows
        router.use_rows([None if seq is None else self._adapter(seq) for seq in rows])
        try:
            yield
        finally:
            router.rows = saved

    def claim(self) -> None:
        """Make the model's KV cache this scheduler's. If another front end used it meanwhile (or it was
        reallocated), nothing this one cached is there any more."""
        model = self.model
        if model.cache_batch != self.max_batch_size or model.cache_len != self.max_seq_len:
            model.setup_cache(self.max_batch_size, self.max_seq_len)
        for slot in self.slots:
            slot.cached, slot.bounds = [], []
        model.kv_owner = self

    # -- queueing ------------------------------------------------------------------------------------------

    def check(self, seq: Sequence, name: str = "the prompt") -> None:
        """Raise ``GenerationError`` for a prompt or budget this scheduler can never serve."""
        spec = seq.spec
        check_prompt(spec.prompt, self.max_seq_len, self.vocab_size, name)
        if spec.adapter is not None:
            router = getattr(self.model, "adapters", None)
            if router is None or spec.adapter not in router.configs:
                known = ", ".join(sorted(router.configs)) if router is not None else ""
                raise GenerationError(f"no LoRA adapter named {spec.adapter!r} (loaded: {known or 'none'})")
        room = self.max_seq_len - len(spec.prompt)
        if not 0 <= spec.shared_prefix <= len(spec.prompt):
            raise GenerationError(f"shared_prefix={spec.shared_prefix} of {name} must be between 0 and its "
                                  f"{len(spec.prompt)} tokens")
        if spec.options:
            for i, option in enumerate(spec.options):
                if not 1 <= len(option) <= room:
                    raise GenerationError(f"option {i} of {name} has {len(option)} tokens; it must have at least 1 "
                                          f"and at most {room} (context {self.max_seq_len} minus the prompt's "
                                          f"{len(spec.prompt)} tokens)")
                if any(not 0 <= t < self.vocab_size for t in option):
                    raise GenerationError(f"option {i} of {name} contains token ids outside the vocabulary "
                                          f"[0, {self.vocab_size})")
        if not 1 <= spec.max_tokens <= room:
            raise GenerationError(
                f"max_tokens={spec.max_tokens} must be >= 1 and at most {room} "
                f"(context {self.max_seq_len} minus the prompt's {len(spec.prompt)} tokens)"
            )

    def add(self, seq: Sequence, name: str = "the prompt") -> None:
        """Check ``seq`` (``GenerationError`` naming it ``name``) and queue it."""
        self.add_all([seq], [name])

    def add_all(self, seqs: list[Sequence], names: list[str]) -> None:
        """Check every sequence, then queue them all: all or none."""
        for seq, name in zip(seqs, names, strict=True):
            self.check(seq, name)
        self.waiting.extend(seqs)

    @property
    def running(self) -> list[Sequence]:
        return [s.seq for s in self.slots if s.seq is not None]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.seq is not None for s in self.slots)

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.running),
            # A copy first: other threads read stats while the stepping thread changes the deque.
            "waiting": sum(not s.cancelled for s in list(self.waiting)),
            "decode_steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens,
            "prefix_cache_hits": self.prefix_hits,
            "prefix_cache_tokens": self.prefix_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
        }

    def remove(self, seqs: list[Sequence]) -> None:
        """Take ``seqs`` out now, waiting or running (a synchronous driver's cleanup after an error or an early
        close); they end "cancelled" unless already finished."""
        gone = {id(s) for s in seqs}
        self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        for slot in self.slots:
            if slot.seq is not None and id(slot.seq) in gone:
                self._release(slot)
        for seq in seqs:
            seq.end("cancelled")

    def end_all(self, message: str, kind: str) -> list[Sequence]:
        """End every waiting and running sequence with an error (shutdown); returns them."""
        ended = [*self.waiting, *self.running]
        self.waiting.clear()
        for slot in self.slots:
            slot.seq = None
        for seq in ended:
            seq.fail(message, kind)
        return ended

    # -- the step ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit, prefill some, decode once; the sequences that changed (finished ones are out of their slot)."""
        changed: list[Sequence] = []
        if self.model.kv_owner is not self:
            self.claim()
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.end("cancelled")
            changed.append(seq)
        self._drop_cancelled(changed)
        self._admit()
        self._prefill_some(changed)
        self._drop_cancelled(changed)
        if any(s.ready for s in self.slots if s.seq is not None):
            self._decode(changed)
        return list(dict.fromkeys(changed))  # each once, in order

    def _drop_cancelled(self, changed: list[Sequence]) -> None:
        for slot in self.slots:
            if slot.seq is not None and slot.seq.cancelled:
                slot.seq.end("cancelled")
                changed.append(slot.seq)
                self._release(slot)

    def _release(self, slot: _Slot) -> None:
        slot.seq, slot.ready = None, False
        self._clock += 1
        slot.last_used = self._clock

    def _reusable(self, slot: _Slot, seq: Sequence, prompt: list[int]) -> int:
        """Prompt tokens whose keys and values ``slot`` already holds, in whole chunks (at least one token of
        the prompt is always left to prefill: its logits choose the first new token; echo scores them all)."""
        if not self.prefix_cache or not slot.cached or seq.spec.echo_logprobs:
            return 0
        if slot.cached_adapter != self._adapter(seq):
            return 0
        n = 0
        limit = min(len(slot.cached), len(prompt) - 1)
        while n < limit and slot.cached[n] == prompt[n]:
            n += 1
        # The cached chunks up to the reuse point must be the ones this prompt's own prefill would compute.
        reuse, start = 0, 0
        for bound in slot.bounds:
            if bound > n or self._chunk_end(start, seq.spec.shared_prefix) != bound:
                break
            reuse = start = bound
        return reuse

    def _chunk_end(self, start: int, shared: int) -> int:
        """Where the prefill chunk starting at ``start`` ends (before the prompt's end cuts it): at the next
        multiple of the chunk size, except that one ends at the shared prefix's end and the later ones follow
        it at whole chunks."""
        if start < shared:
            return min((start // self.chunk + 1) * self.chunk, shared)
        return start + self.chunk - (start - shared) % self.chunk

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            seq = self.waiting.popleft()
            prompt = list(seq.spec.prompt)
            # The longest cached prefix wins; without one, the least recently used slot is overwritten.
            reuse, _, slot = max(((self._reusable(s, seq, prompt), -s.last_used, s) for s in free),
                                 key=lambda c: c[:2])
            self._clock += 1
            slot.cached = slot.cached[:reuse]
            slot.bounds = [b for b in slot.bounds if b <= reuse]
            slot.cached_adapter = self._adapter(seq)
            slot.seq, slot.position, slot.ready, slot.admitted = seq, reuse, False, self._clock
            slot.lookup = PromptLookup() if self.prompt_lookup else None
            slot.draft_len = self.prompt_lookup
            self.prompt_tokens += len(prompt)
            if reuse:
                self.prefix_hits += 1
                self.prefix_tokens += reuse
                log.debug("prefix cache: %d of %d prompt tokens reused", reuse, len(prompt))

    def _prefill_some(self, changed: list[Sequence]) -> None:
        """Prefill waiting prompts, oldest admission first, chunk by chunk within the step's token budget."""
        budget = self.tokens_per_step
        for index, slot in sorted(enumerate(self.slots), key=lambda item: item[1].admitted):
            while budget > 0 and slot.seq is not None and not slot.ready:
                self._guard([slot], changed, lambda: self._borrow(index, slot))
                seq = slot.seq
                if seq is None:  # the copy failed: the sequence has ended with the error
                    break
                start = slot.position
                size = min(self._chunk_end(start, seq.spec.shared_prefix), len(seq.spec.prompt)) - start
                budget -= size
                self._guard([slot], changed, lambda: self._prefill_chunk(index, slot, start, size, changed))
            if budget <= 0:
                return

    def _borrow(self, index: int, slot: _Slot) -> None:
        """Before prefilling, copy from any other slot (running or free) the whole chunks it holds that this
        prompt would compute next: prompts admitted together share a system prompt that only one has prefilled
        yet, and a running slot's chunks are never overwritten (its writes land past them)."""
        seq = slot.seq
        if not self.prefix_cache or seq.spec.echo_logprobs or slot.position != len(slot.cached):
            return
        prompt = seq.spec.prompt
        best, source = slot.position, None
        for other_index, other in enumerate(self.slots):
            if other is slot or len(other.cached) <= best:
                continue
            reuse = self._reusable(other, seq, prompt)
            if reuse > best:
                best, source = reuse, (other_index, other)
        if source is None:
            return
        other_index, other = source
        self.model.copy_cache(other_index, index, slot.position, best)
        if slot.position == 0:
            self.prefix_hits += 1
        self.prefix_tokens += best - slot.position
        slot.cached = list(prompt[:best])
        slot.bounds = [b for b in other.bounds if b <= best]
        slot.position = best

    def _prefill_chunk(self, index: int, slot: _Slot, start: int, size: int, changed: list[Sequence]) -> None:
        seq = slot.seq
        prompt = seq.spec.prompt
        chunk = torch.tensor([list(prompt[start : start + size])], dtype=torch.long, device=self.device)
        rows = torch.tensor([index], device=self.device)
        # Into its own slot, alone: the numbers never depend on what else is running.
        with self._route([seq]):
            logits = self.model(chunk, start, last_only=not seq.spec.echo_logprobs, cache_rows=rows)[0]
        if seq.spec.echo_logprobs:
            seq.score_prompt(logits, start)
        slot.position = start + size
        whole = start + size == self._chunk_end(start, seq.spec.shared_prefix)
        if whole and len(slot.cached) == start:  # a whole chunk (not cut by the prompt's end): reusable later
            slot.cached += prompt[start : start + size]
            slot.bounds.append(start + size)
        if slot.position == len(prompt):
            if seq.spec.options:
                self._score_options(index, slot, logits[-1], changed)
                return
            slot.ready = True
            self._accept(slot, logits[-1], changed)

    def _score_options(self, index: int, slot: _Slot, last: torch.Tensor, changed: list[Sequence]) -> None:
        """Score a prefilled prompt's options: every option of two or more tokens runs as a branch of the slot's
        cache row (``Transformer.branches``), as many per batched pass as ``BRANCH_BYTES`` of scratch cache
        allow; then the sequence ends and the slot (its cached chunks untouched) is free again."""
        seq = slot.seq
        options, length = seq.spec.options, len(seq.spec.prompt)
        longer = [i for i, option in enumerate(options) if len(option) > 1]
        cache = self.model.layers[0].attention.cache
        per_branch = 2 * len(self.model.layers) * cache.k[0].numel() // cache.k.shape[2] * cache.k.element_size()
        branches: dict[int, list[float]] = {}
        while longer:
            extra = max(len(options[i]) for i in longer) - 1
            count = max(1, min(len(longer), BRANCH_BYTES // (per_branch * (length + extra))))
            group, longer = longer[:count], longer[count:]
            extra = max(len(options[i]) for i in group) - 1
            # Each branch feeds its option but the last token (whose logprob the previous position gives);
            # shorter options are padded, and what the padding computes is never read.
            tokens = torch.zeros(len(group), extra, dtype=torch.long)
            for row, i in enumerate(group):
                tokens[row, : len(options[i]) - 1] = torch.tensor(list(options[i][:-1]))
            with self._route([seq] * len(group)), self.model.branches(index, length, len(group), extra):
                hidden = self.model(tokens.to(self.device), length, hidden=True)
                # Logits only where an option token is read, one option at a time: a (rows, T, vocabulary)
                # tensor for the whole group could take gigabytes.
                for row, i in enumerate(group):
                    logits = self.model.output(hidden[row, : len(options[i]) - 1]).float()
                    targets = torch.tensor(list(options[i][1:]), device=logits.device)[:, None]
                    branches[i] = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).tolist()
        seq.score_options(last, branches)
        changed.append(seq)
        self._release(slot)

    def _decode(self, changed: list[Sequence]) -> None:
        drafts = self._drafts() if self.prompt_lookup else {}
        if drafts:
            self._decode_drafts(drafts, changed)
            return
        # Rows 0..highest busy slot run together: a contiguous range lets the KV cache hand out views instead
        # of gathering rows. Other rows compute a throwaway row whose cache write lands where nothing is kept:
        # a slot still prefilling at its next prompt position (its next chunk overwrites it), a free slot just
        # past the chunks it caches (never inside them: the cache is never full of whole chunks).
        busy = [i for i, s in enumerate(self.slots) if s.seq is not None]
        width = busy[-1] + 1
        tokens = torch.zeros(width, 1, dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        for i in range(width):
            slot = self.slots[i]
            if slot.seq is not None:
                tokens[i, 0], positions[i] = slot.last, slot.position
            else:
                positions[i] = min(len(slot.cached), self.max_seq_len - 1)
        ready = [self.slots[i] for i in busy if self.slots[i].ready]
        kv_len = int(positions.max()) + 1
        try:
            with self._route([self.slots[i].seq for i in range(width)]):
                logits = self.model(tokens.to(self.device), positions.to(self.device), last_only=True, kv_len=kv_len)
        except ParallelError:
            raise  # the tensor-parallel job is broken: nothing can be served any more
        except Exception as exc:  # noqa: BLE001 - fail the sequences of this step, keep serving the rest
            self._step_failed(ready, exc, changed)
            return
        self.steps += 1
        for i in busy:
            slot = self.slots[i]
            if slot.ready and slot.seq is not None:
                slot.position += 1
                self._guard([slot], changed, lambda: self._accept(slot, logits[i, -1], changed))

    def _drafts(self) -> dict[int, list[int]]:
        """Draft tokens per slot index (only slots that have some), within the step's row budget."""
        ready = [(i, s) for i, s in enumerate(self.slots) if s.seq is not None and s.ready]
        spare = LOOKUP_MAX_ROWS - len(ready)
        drafts: dict[int, list[int]] = {}
        for i, slot in ready:
            seq = slot.seq
            # Room: the budget's last token comes from the last row's logits, and every position must fit.
            room = min(slot.draft_len, spare, seq.spec.max_tokens - len(seq.generated) - 1,
                       self.max_seq_len - 1 - slot.position)
            if room <= 0 or slot.lookup is None:
                continue
            draft = slot.lookup.draft([*seq.spec.prompt, *seq.generated], room)
            if draft:
                drafts[i] = draft
                spare -= len(draft)
        return drafts

    def _decode_drafts(self, drafts: dict[int, list[int]], changed: list[Sequence]) -> None:
        """One decode step over every ready slot's next input and its draft (one row per token, each at its
        own position in its slot's cache row), then acceptance position by position."""
        spans: list[tuple[int, int, list[int]]] = []  # slot index, first row, draft
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for i, slot in enumerate(self.slots):
            if slot.seq is None or not slot.ready:
                continue
            draft = drafts.get(i, [])
            spans.append((i, len(tokens), draft))
            tokens += [slot.last, *draft]
            positions += range(slot.position, slot.position + 1 + len(draft))
            rows += [i] * (1 + len(draft))
        row_seqs = [self.slots[i].seq for i in rows]
        try:
            with self._route(row_seqs):
                logits = self.model(
                    torch.tensor(tokens, device=self.device)[:, None],
                    torch.tensor(positions, device=self.device),
                    last_only=True,
                    kv_len=max(positions) + 1,
                    cache_rows=torch.tensor(rows, device=self.device),
                )
        except ParallelError:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _decode
            self._step_failed([self.slots[i] for i, _, _ in spans], exc, changed)
            return
        self.steps += 1
        for i, first, draft in spans:
            slot = self.slots[i]
            self.draft_tokens += len(draft)
            self._guard([slot], changed, lambda: self._accept_drafted(slot, logits[first : first + 1 + len(draft), -1],
                                                                      draft, changed))

    def _accept_drafted(self, slot: _Slot, logits: torch.Tensor, draft: list[int], changed: list[Sequence]) -> None:
        """Accept tokens from rows' logits in order while the chosen token is the draft's next one (row j's
        logits assumed draft[:j] came next)."""
        for j in range(len(logits)):
            slot.position += 1
            self._accept(slot, logits[j], changed)
            if slot.seq is None or j == len(draft) or slot.last != draft[j]:
                break
            self.accepted_draft_tokens += 1
        # Every draft row costs compute: ask for more after a draft taken whole, fewer after a miss (as
        # transformers' assisted generation adapts its draft length).
        if draft:
            whole = j == len(draft)
            slot.draft_len = min(self.prompt_lookup, slot.draft_len + 2) if whole else max(1, slot.draft_len - 1)

    def _accept(self, slot: _Slot, logits: torch.Tensor, changed: list[Sequence]) -> None:
        seq = slot.seq
        before = len(seq.generated)
        seq.accept(logits)
        self.generated_tokens += len(seq.generated) - before
        if seq.generated:
            slot.last = seq.generated[-1]
        changed.append(seq)
        if seq.done:
            self._release(slot)

    def _guard(self, slots: list[_Slot], changed: list[Sequence], work) -> None:
        """Run ``work``; an error ends only the sequences of ``slots`` (the request's fault for a
        ``GenerationError``, the server's for anything else)."""
        try:
            work()
        except GenerationError as exc:
            for slot in slots:
                self._finish_failed(slot, str(exc), "request", changed)
        except ParallelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine must survive any single failure
            log.exception("generation failed")
            for slot in slots:
                self._finish_failed(slot, f"generation failed: {type(exc).__name__}: {exc}", "server", changed)

    def _step_failed(self, slots: list[_Slot], exc: Exception, changed: list[Sequence]) -> None:
        """A decode step's forward raised: end that step's sequences (a server fault), keep the rest serving."""
        log.exception("decode step failed")
        for slot in slots:
            self._finish_failed(slot, f"generation failed: {type(exc).__name__}: {exc}", "server", changed)

    def _finish_failed(self, slot: _Slot, message: str, kind: str, changed: list[Sequence]) -> None:
        if slot.seq is None:
            return
        slot.seq.fail(message, kind)
        changed.append(slot.seq)
        # The cached chunks stay valid: a failed step writes only at or beyond the sequence's own position.
        self._release(slot)
