"""Choosing the next token: sampling parameters, their validation, penalties, top-k/top-p/min-p and draws.

Meta's behaviour is the default (softmax(logits / T), then top-p exactly as its ``sample_top_p``; argmax at
T == 0); the rest are the knobs users of llama.cpp, vLLM and the OpenAI API expect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import GenerationError

# The largest float32: where an extreme (but accepted) penalty, bias or temperature would overflow a logit to
# +inf, it stops here instead, so softmax never sees inf - inf.
_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = torch.finfo(torch.float32).tiny


class LogitsProcessor(Protocol):
    """Edits one row's next-token logits, e.g. to constrain the output format while decoding.

    ``generated`` holds the ids generated so far for that row (prompt excluded); ``logits`` is the row's
    float32 (vocab,) vector after penalties and before temperature. Return the new logits (in place is fine);
    ``-inf`` forbids a token.
    """

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``min_p == 0`` disable them."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> GenerationError:
            return GenerationError(f"invalid {name}={getattr(self, name)!r}: must be {rule}")

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad("top_k", "an integer >= 0 (0 or -1 disables it)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise bad("min_p", "in [0, 1]")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty < math.inf):
            raise bad("repetition_penalty", "a finite number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise bad(name, "in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "an integer")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
                raise GenerationError(f"invalid logit_bias entry {token!r}: {bias!r} (token id -> finite number)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether token counts are needed (any repetition/presence/frequency penalty is on)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_mask: torch.Tensor | None, output_counts: torch.Tensor | None
) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF/vLLM rule: divide positive logits, multiply negative ones),
    presence and frequency penalties over the output only (OpenAI's rule). Shapes: (B, V).

    Any penalty in (0, inf) is safe: the result is clamped to finite float32, so a penalty of 1e-300 makes a
    seen token overwhelmingly likely (and 1e300 overwhelmingly unlikely) instead of producing inf or NaN."""
    if params.repetition_penalty != 1.0 and output_counts is not None:
        seen = output_counts > 0
        if prompt_mask is not None:
            seen = seen | prompt_mask
        # Kept within float32's normal range so that 0 * penalty is never 0 * inf (NaN).
        penalty = min(max(params.repetition_penalty, _F32_TINY), _F32_MAX)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-_F32_MAX, _F32_MAX)
        logits = torch.where(seen, penalised, logits)
    if output_counts is not None and (params.presence_penalty or params.frequency_penalty):
        counts = output_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor(list(bias.keys()), device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[..., ids] += values
    return logits


def nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's top-p rule on one row (V,): the likeliest tokens, in descending order, until the mass *before*
    a token exceeds ``p``; returns (their probs, their ids). The top-1 token always survives.

    Only the head of the distribution is sorted (``topk`` with a growing k): a full sort of a 128k vocabulary
    costs several milliseconds per token, and the nucleus of a trained model is usually a few dozen tokens.
    The survivors are those of Meta's full sort (same float32 cumulative sums, exact ties at the cut
    resolved as its stable sort does).
    """
    vocab = probs.shape[-1]
    if p >= 1.0:
        return probs, torch.arange(vocab, device=probs.device)
    k = min(64, vocab)
    while True:
        values, ids = torch.topk(probs, k)
        dropped = torch.cumsum(values, dim=-1) - values > p
        if k == vocab or bool(dropped[-1]):
            break
        k = min(k * 8, vocab)
    kept = int((~dropped).sum())  # a prefix: the mass before a token only grows
    values, ids = values[:kept], ids[:kept]
    # Exact ties cut at the boundary: keep the lowest ids, as a stable sort (and Meta's, on the CPU) does.
    if kept < vocab:
        last = values[-1]
        tied = int((values == last).sum())
        everyone = torch.nonzero(probs == last).flatten()  # ascending ids
        if len(everyone) > tied:
            ids = torch.cat([ids[values != last], everyone[:tied]])
    return values, ids


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row (B, V) -> (B, 1) from Meta's nucleus distribution (the survivors of top-p,
    renormalised), by one uniform draw against their cumulative mass (float64, so no token's share is lost to
    rounding, and a token of probability 0 is never drawn)."""
    out = torch.empty(probs.shape[0], 1, dtype=torch.long, device=probs.device)
    for row in range(probs.shape[0]):
        values, ids = nucleus(probs[row], p)
        cumulative = torch.cumsum(values.double(), dim=-1)
        u = torch.rand((), dtype=torch.float64, generator=generator, device=probs.device) * cumulative[-1]
        index = int(torch.searchsorted(cumulative, u[None], right=True))
        if index == len(values):  # u * total rounded up to the total itself: the last token with mass
            index = int(torch.nonzero(values > 0)[-1])
        out[row, 0] = ids[index]
    return out


def checked_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits ready for a choice: +inf (an extreme bias) becomes the largest float32, and a row that is
    NaN anywhere or forbids every token raises ``GenerationError`` (callers end that sequence alone)."""
    if bool(torch.isnan(logits).any()):
        raise GenerationError("the model's next-token logits are NaN: its numbers broke down (no token to choose)")
    if bool((logits == -math.inf).all(dim=-1).any()):
        raise GenerationError("no token is allowed: logit_bias or a logits processor forbids every token")
    return logits.clamp(max=_F32_MAX)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T for T > 0, where a T too small for float32 (logits / T overflows) acts as greedy.

    As in vLLM, a vanishing temperature is the greedy limit: the row's top tokens keep 0 and the rest become
    -inf, so softmax puts all the mass on the argmax (shared evenly by exact ties). Ordinary temperatures
    compute exactly ``logits / T``, Meta's arithmetic.
    """
    scaled = logits / min(temperature, _F32_MAX)
    top = scaled.amax(dim=-1, keepdim=True)
    overflowed = ~torch.isfinite(top)  # +inf, or NaN from 0 / T where T rounds to 0 in float32
    if bool(overflowed.any()):
        argmax = logits == logits.amax(dim=-1, keepdim=True)
        greedy = torch.zeros_like(logits).masked_fill_(~argmax, -math.inf)
        scaled = torch.where(overflowed, greedy, scaled)
    return scaled


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """softmax(logits / T) after top-k and before min-p (B, V); the distribution top-p then samples from."""
    logits = scaled_logits(logits, params.temperature)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of (B, V) float32 logits -> (B,) ids.

    Raises ``GenerationError`` when a row has nothing to choose from (NaN logits, every token forbidden).
    """
    logits = checked_logits(logits)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    probs = next_token_probs(logits, params)
    return sample_top_p(probs, params.top_p, generator).squeeze(-1)
