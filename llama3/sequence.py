"""One sequence being generated: what to generate (``GenerationSpec``), and its state and next-token step.

``Sequence.accept(logits)`` is the only place a token is chosen, for every front end (Meta's API, the server,
ShopBench, the benchmarks), in this order: penalties, logit bias, logits processors, the grammar, the choice (greedy, top-k,
top-p, min-p, with the sequence's own generator), the token's logprob and top alternatives, then the end
conditions: a stop token, the budget, a stop string. ``check_prompt`` is the one validation of prompt ids.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from .constraints.grammar import Grammar, GrammarConstraint
from .errors import GenerationError
from .sampling import LogitsProcessor, SamplingParams, apply_logit_bias, apply_penalties, choose
from .tokenizer import StopStringWatch, Tokenizer


def check_prompt(prompt: Seq[int], context: int, vocab_size: int, name: str = "the prompt") -> None:
    """Raise ``GenerationError`` unless ``prompt`` is non-empty, in the vocabulary, and leaves room to generate."""
    if len(prompt) == 0:
        raise GenerationError(f"{name} is empty")
    if len(prompt) >= context:
        raise GenerationError(
            f"{name} has {len(prompt)} tokens but the context is max_seq_len={context} tokens, which leaves no "
            "room to generate; shorten the prompt or use a larger max_seq_len"
        )
    if any(not 0 <= t < vocab_size for t in prompt):
        raise GenerationError(f"{name} contains token ids outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class GenerationSpec:
    """One sequence to generate: prompt ids, token budget, sampling, stop strings and what to report.

    ``logprobs`` reports each token's log-probability, with ``top_logprobs`` alternatives, under the model's
    raw distribution (before penalties, bias, processors and temperature: Meta's and vLLM's definition).
    ``echo_logprobs`` also scores every prompt token after the first (Meta's ``echo``). ``processors`` edit the
    logits before each choice; ``grammar`` then allows only what it accepts next, and a stop token only where
    it may end (structured output). ``skip_special`` leaves special tokens out of the text. ``adapter`` names the
    LoRA adapter this sequence runs with (``llama3.lora``; None: the model's engaged one, if any).
    ``options`` (token-id lists) scores continuations instead of generating: the prompt is prefilled once, every
    option runs as a branch of it in one batched pass, and ``Sequence.option_logprobs`` holds each option's
    per-token log-probabilities (multiple-choice scoring, as evaluation harnesses do); nothing is generated.
    ``shared_prefix``: how many leading prompt tokens other prompts share (a system turn, few-shot examples); the
    prefix cache then reuses exactly those, even when they are shorter than a prefill chunk.
    """

    prompt: Seq[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: Seq[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    processors: Seq[LogitsProcessor] = ()
    echo_logprobs: bool = False
    skip_special: bool = True
    grammar: Grammar | None = None
    adapter: str | None = None
    options: Seq[Seq[int]] = ()
    shared_prefix: int = 0


@dataclass
class TokenLogprob:
    """A generated token: its id, the text it added to the output, its logprob and the top alternatives."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, float]]


class Sequence:
    """A sequence's state from admission to its end: generated ids, logprobs, text, and why it finished.

    ``finish_reason``: None while running, then "stop" (stop token or string), "length", "cancelled" or "error"
    (``error`` says why; ``error_kind`` is "request" when the request's own values caused it, else "server" or
    "shutdown"). ``tag`` is the caller's, for mapping results back.
    """

    def __init__(
        self, spec: GenerationSpec, tokenizer: Tokenizer, generator: torch.Generator, stop_tokens: frozenset[int],
        *, tag: object = None,
    ) -> None:
        self.spec, self.generator, self.stop_tokens, self.tag = spec, generator, stop_tokens, tag
        self.watch = StopStringWatch(tokenizer, list(spec.stop), skip_special=spec.skip_special)
        self.generated: list[int] = []
        self.entries: list[TokenLogprob] = []  # with spec.logprobs, one per generated token
        self.prompt_logprobs: list[float] = []  # with spec.echo_logprobs: logprob of prompt[j] for j >= 1
        self.option_logprobs: list[list[float]] = []  # with spec.options: each option token's logprob
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_kind: str | None = None
        self.cancelled = False
        self._counts: torch.Tensor | None = None  # (V,) output token counts, for penalties
        self._prompt_mask: torch.Tensor | None = None  # (V,) prompt tokens, for the repetition penalty
        self._shown = 0  # characters of text already handed out by take_delta
        self._grammar = GrammarConstraint(spec.grammar, tokenizer) if spec.grammar is not None else None
        self._sent = 0  # logprob entries already handed out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (from any thread)."""
        self.cancelled = True

    def fail(self, message: str, kind: str) -> None:
        if not self.done:
            self.finish_reason, self.error, self.error_kind = "error", message, kind

    def end(self, reason: str) -> None:
        if not self.done:
            self.finish_reason = reason
            self.watch.finish()

    def score_prompt(self, logits: torch.Tensor, start: int) -> None:
        """Echo logprobs from a prefill chunk's logits (T, V) at prompt positions start..start+T-1."""
        prompt = self.spec.prompt
        targets = torch.tensor(list(prompt[start + 1 : start + 1 + logits.shape[0]]), device=logits.device)
        if len(targets):
            logp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
            self.prompt_logprobs += logp.gather(-1, targets[:, None]).squeeze(-1).tolist()

    def score_options(self, first: torch.Tensor, rest: dict[int, list[float]]) -> None:
        """Record each option's token logprobs and end: ``first`` (V,) are the logits after the prompt (they give
        every option's first token), ``rest[i]`` the logprobs of option i's later tokens (options of 2+ tokens)."""
        first_logp = torch.log_softmax(first.float(), dim=-1)
        self.option_logprobs = [[float(first_logp[option[0]]), *rest.get(i, [])]
                                for i, option in enumerate(self.spec.options)]
        self.end("stop")

    def accept(self, logits: torch.Tensor) -> None:
        """Choose the next token from this sequence's (V,) float32 logits, then record it or finish.

        Raises ``GenerationError`` when there is nothing to choose (NaN logits, every token forbidden);
        the scheduler then ends this sequence alone.
        """
        spec, params = self.spec, self.spec.params
        row = logits[None]
        if params.needs_history:
            if self._counts is None:
                self._counts = torch.zeros(logits.shape[-1], dtype=torch.int32, device=logits.device)
                self._prompt_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                self._prompt_mask[torch.tensor(list(spec.prompt), device=logits.device)] = True
            row = apply_penalties(row, params, self._prompt_mask[None], self._counts[None])
        row = apply_logit_bias(row, params.logit_bias)
        if spec.processors:
            edited = row[0].clone()
            for proc in spec.processors:
                edited = proc(self.generated, edited)
            row = edited[None]
        if self._grammar is not None:
            row = self._grammar(self.generated, row[0].clone(), spec.max_tokens - len(self.generated))[None]
        token = int(choose(row, params, self.generator)[0])
        if token in self.stop_tokens:
            self.end("stop")
            return
        self.generated.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        before = len(self.watch.text)
        if self.watch.push(token):
            self.end("stop")  # the stop string is cut; this token's text is not part of the output
            return
        if spec.logprobs:
            self.entries.append(self._logprob(logits, token, self.watch.text[before:], spec.top_logprobs))
        if len(self.generated) >= spec.max_tokens:
            self.end("length")

    @staticmethod
    def _logprob(logits: torch.Tensor, token: int, text: str, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        alternatives: list[tuple[int, float]] = []
        if top > 0:
            values, ids = torch.topk(logp, top)
            alternatives = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token=token, text=text, logprob=float(logp[token]), top=alternatives)

    # -- output for streaming drivers ------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The output text so far (cut before a stop string once one has appeared)."""
        return self.watch.text

    def kept_tokens(self) -> list[int]:
        """Generated ids that lie wholly before a stop string (all of them when there is none)."""
        return self.generated[: self.watch.tokens_before_cut()]

    def take_delta(self) -> tuple[str, list[TokenLogprob]]:
        """The text (and logprob entries) that can be shown now and was not handed out before.

        While running, a tail that could still grow into a stop string is held back; logprob entries go out
        with the text they produced (after a stop string, only whole tokens before it).
        """
        text = self.watch.releasable(final=self.done)
        delta = text[self._shown :]
        self._shown = len(text)
        ready = []
        for entry, end in zip(self.entries[self._sent :], self.watch.char_ends[self._sent :]):
            if end > len(text):  # its text is held back (or cut by a stop string)
                break
            ready.append(entry)
        # At the end, entries past a stop string's cut are dropped with their text.
        self._sent = len(self.entries) if self.done else self._sent + len(ready)
        return delta, ready

