"""Token-level batched decoding: prefill ragged prompts together, then one forward per step for all rows.

Meta's ``generate`` prefills up to the shortest prompt and teacher-forces longer prompts one token per step.
Here every row's whole prompt is prefilled (together when the lengths are equal, else each into its own cache
row), then rows decode at their own positions (per-row ``start_pos``). The arithmetic is the same causal attention over the same keys, so greedy
outputs match Meta's while long ragged batches need far fewer forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import Transformer
from .sampling import LogitsProcessor, SamplingParams, apply_logit_bias, apply_penalties, choose


@dataclass
class Row:
    """One sequence of a batch: its prompt, what it generated, and why it stopped."""

    prompt: list[int]
    budget: int  # most tokens it may generate
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # for echo: logprob of prompt[j], j >= 1
    finish_reason: str | None = None  # "stop" (stop token or string), "length", or set by the caller

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class DecodeBatch:
    """Step-wise decoding of a batch of prompts; callers may stop rows early (stop strings, cancellation).

    >>> batch = DecodeBatch(model, prompts, max_gen_len=32, params=SamplingParams(temperature=0), stop_tokens={2})
    >>> while not batch.done:
    ...     new = batch.step()   # one new token id per row, None for rows already finished
    """

    def __init__(
        self,
        model: Transformer,
        prompts: Sequence[Sequence[int]],
        max_gen_len: int,
        params: SamplingParams,
        stop_tokens: set[int] | frozenset[int],
        *,
        generator: torch.Generator | None = None,
        processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
        logprobs: bool = False,
        echo_logprobs: bool = False,
    ) -> None:
        if model.cache_len == 0:
            raise ValueError("DecodeBatch needs a model with a KV cache (model.setup_cache)")
        self.model, self.params, self.generator = model, params, generator
        self.stop_tokens = frozenset(stop_tokens)
        self.want_logprobs, self.echo_logprobs = logprobs, echo_logprobs
        self.rows = [Row(list(p), budget=min(max_gen_len, model.cache_len - len(p))) for p in prompts]
        self.processors = list(processors) if processors is not None else [None] * len(self.rows)
        self.device = model.device
        vocab = model.config.vocab_size
        self.output_counts = self.prompt_mask = None
        if params.needs_history:
            bsz = len(self.rows)
            self.output_counts = torch.zeros(bsz, vocab, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(bsz, vocab, dtype=torch.bool, device=self.device)
            for i, row in enumerate(self.rows):
                self.prompt_mask[i, torch.tensor(row.prompt, device=self.device)] = True
        self.positions: torch.Tensor | None = None  # (B,) cache position where each row's next input token goes
        self.last_tokens: torch.Tensor | None = None  # (B,) the token each row feeds next
        for row in self.rows:
            if row.budget <= 0:
                row.finish_reason = "length"

    @property
    def done(self) -> bool:
        return all(row.done for row in self.rows)

    def finish(self, index: int, reason: str = "stop") -> None:
        """End row ``index`` now (its later steps are computed but ignored)."""
        if not self.rows[index].done:
            self.rows[index].finish_reason = reason

    @torch.inference_mode()
    def step(self) -> list[int | None]:
        """Run one forward (the prefill on the first call) and choose one token per unfinished row."""
        if self.positions is None:
            logits = self._prefill()
        else:
            kv_len = int(self.positions.max()) + 1
            logits = self.model(self.last_tokens[:, None], self.positions, last_only=True, kv_len=kv_len)[:, -1]
            # Finished rows keep stepping with the batch; clamping keeps their (ignored) cache writes in bounds.
            self.positions = (self.positions + 1).clamp_(max=self.model.cache_len - 1)
        return self._choose(logits)

    def _prefill(self) -> torch.Tensor:
        lengths = [len(r.prompt) for r in self.rows]
        if len(set(lengths)) == 1:
            groups = [list(range(len(self.rows)))]
        else:
            # Ragged prompts are prefilled one by one into their own cache rows: padding them to the longest
            # would cost up to 4x the compute (100- to 400-token prompts), and each prompt alone is already a
            # large enough matrix for an efficient GEMM.
            groups = [[i] for i in range(len(self.rows))]
        logits = []
        for group in groups:
            tokens = torch.tensor([self.rows[i].prompt for i in group], device=self.device)
            cache_rows = torch.tensor(group, device=self.device) if len(groups) > 1 else None
            if self.echo_logprobs:
                all_logits = self.model(tokens, 0, cache_rows=cache_rows)  # Meta's echo scores every prompt token
                logp = -F.cross_entropy(all_logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
                for j, i in enumerate(group):
                    self.rows[i].prompt_logprobs = logp[j].tolist()
                logits.append(all_logits[:, -1])
            else:
                logits.append(self.model(tokens, 0, last_only=True, cache_rows=cache_rows)[:, -1])
        self.positions = torch.tensor(lengths, device=self.device)  # each row's first new token follows its prompt
        return torch.cat(logits)

    def _choose(self, logits: torch.Tensor) -> list[int | None]:
        raw = logits
        logits = apply_penalties(logits, self.params, self.prompt_mask, self.output_counts)
        logits = apply_logit_bias(logits, self.params.logit_bias)
        for i, procs in enumerate(self.processors):
            if procs and not self.rows[i].done:
                row_logits = logits[i].clone()
                for proc in procs:
                    row_logits = proc(self.rows[i].generated, row_logits)
                logits[i] = row_logits
        next_tokens = choose(logits, self.params, self.generator)
        if self.want_logprobs:
            token_logprobs = (-F.cross_entropy(raw, next_tokens, reduction="none")).tolist()
        chosen = next_tokens.tolist()
        out: list[int | None] = []
        for i, row in enumerate(self.rows):
            if row.done:
                out.append(None)
                continue
            token = chosen[i]
            if token in self.stop_tokens:
                row.finish_reason = "stop"
                out.append(None)
                continue
            row.generated.append(token)
            if self.want_logprobs:
                row.logprobs.append(token_logprobs[i])
            if self.output_counts is not None:
                self.output_counts[i, token] += 1
            if len(row.generated) >= row.budget:
                row.finish_reason = "length"
            out.append(token)
        self.last_tokens = next_tokens
        return out
