"""``ShopBenchModel``: answer ShopBench prompts with a local model, in batches, with constrained decoding.

Each prompt is routed (:mod:`.router`), wrapped in its task type's system instruction and the
model's chat format, and generated through the decoding core with continuous batching (``Llama.run``). With constraints
on (the default) the answer format is enforced while decoding: one offered digit for
multiple-choice (a grammar, through llguidance), a permutation of the listed items for ranking, N distinct
listed items for retrieval, phrases copied from the query for NER and from the review for extractive
generation (``copy_mode="strict"``; ``"bias"`` only favours the source's tokens), and one line for other
generation. Distinct items and copied phrases are byte automata of our own (``llama3.constraints``): a grammar
could state them only by listing every permutation or every phrase of the source. With constraints off, the
seed's regex post-processing repairs the free-form answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...constraints import (AutomatonConstraint, CopyAutomaton, CopyBiasProcessor, Grammar, LineLimitProcessor,
                            NumberListAutomaton)
from ...sampling import SamplingParams
from ...sequence import GenerationSpec
from .parsing import repair_response
from .prompts import build_dialog
from .router import Route, route

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Prediction", "ShopBenchModel"]

# Caps on generated tokens per routed type when decoding is free (constrained lists and choices
# need fewer: their automaton bounds the length exactly).
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "multiple-choice": 16,
    "ranking": 32,
    "retrieval": 32,
    "named_entity_recognition": 32,
    "generation": 128,
    "extraction": 16,  # generation answered by copying a short phrase ("extract the keyphrase")
}



@dataclass
class Prediction:
    """What the model did with one prompt."""

    route: Route
    raw: str  # the decoded generation
    response: str  # the answer handed to the official parser: raw, or repaired when unconstrained
    prompt_tokens: int
    generated_tokens: int
    truncated: bool = False  # the prompt was cut in the middle to fit max_seq_len


@dataclass
class _Job:
    index: int
    route: Route
    tokens: list[int]
    max_new: int
    processors: list[Callable[..., Any]] | None
    grammar: Grammar | None
    truncated: bool


class ShopBenchModel:
    """The seed's interface (``predict`` / ``batch_predict``) over a ``llama3.Llama`` generator."""

    def __init__(self, llm: Any, *, batch_size: int = 16, constrain: bool = True, repair: bool = True,
                 temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: Mapping[str, int] | None = None,
                 copy_mode: str = "strict", copy_bonus: float = 5.0, ner_max_items: int = 3) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if copy_mode not in ("strict", "bias"):
            raise ValueError(f"copy_mode must be 'strict' or 'bias', got {copy_mode!r}")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.batch_size = batch_size
        self.constrain = constrain
        self.repair = repair
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
        self.copy_mode = copy_mode
        self.copy_bonus = copy_bonus
        self.ner_max_items = ner_max_items

    @classmethod
    def load(cls, model_path: str | Path | None = None, *, tokenizer_path: str | Path | None = None,
             max_seq_len: int | None = None, batch_size: int = 16, device: str | None = None, dtype: Any = None,
             seed: int = 1, **kwargs: Any) -> ShopBenchModel:
        """Build the generator (the project's default model when ``model_path`` is None) and wrap it."""
        from ...generation import Llama  # imported here: parsing and scoring do not need the engine

        llm = Llama.build(ckpt_dir=None if model_path is None else str(model_path),
                          tokenizer_path=None if tokenizer_path is None else str(tokenizer_path),
                          max_seq_len=max_seq_len, max_batch_size=batch_size, seed=seed, device=device, dtype=dtype)
        return cls(llm, batch_size=batch_size, **kwargs)

    # -- the seed's interface -------------------------------------------------------------------

    def predict(self, prompt: str, is_multiple_choice: bool) -> str:
        """Answer one prompt; the returned string is what the official parser reads."""
        return self.run([prompt], [is_multiple_choice])[0].response

    def batch_predict(self, prompts: Sequence[str] | Mapping[str, Sequence[str]],
                      is_multiple_choice: bool | Sequence[bool]) -> list[str]:
        """Answer many prompts (a list, or the official kit's ``{"prompt": [...]}`` batch)."""
        if isinstance(prompts, Mapping):
            prompts = prompts["prompt"]
        prompts = list(prompts)
        flags = [is_multiple_choice] * len(prompts) if isinstance(is_multiple_choice, bool) else list(is_multiple_choice)
        return [p.response for p in self.run(prompts, flags)]

    # -- batched generation ---------------------------------------------------------------------

    def _constraint(self, r: Route) -> tuple[list[Callable[..., Any]] | None, Grammar | None, int]:
        """Logits processors or a grammar for one routed prompt, and the most tokens it may generate."""
        if self.constrain and r.task_type == "multiple-choice" and r.options:
            options = [str(n) for n in r.options]
            # One token per byte at worst, then the stop token.
            return None, Grammar.choice(options), max(len(o.encode()) for o in options) + 1
        processors, cap = self._processors(r)
        return processors, None, cap

    def _processors(self, r: Route) -> tuple[list[Callable[..., Any]] | None, int]:
        """Logits processors for one routed prompt, and the most tokens it may generate."""
        cap = self.max_new_tokens.get(r.task_type, self.max_new_tokens["generation"])
        if not self.constrain:
            return None, cap
        automaton: Any = None
        if r.task_type == "ranking" and r.items:
            automaton = NumberListAutomaton(r.items)
        elif r.task_type == "retrieval" and r.items:
            automaton = NumberListAutomaton(r.items, min(r.pick or 3, len(r.items)))
        if automaton is not None:
            proc = AutomatonConstraint(self.tokenizer, automaton)
            return [proc], proc.max_tokens
        if r.source and r.task_type in ("named_entity_recognition", "generation"):
            if self.copy_mode == "strict":
                ner = r.task_type == "named_entity_recognition"
                items = self.ner_max_items if ner else 1
                cap = cap if ner else self.max_new_tokens["extraction"]
                try:
                    proc = AutomatonConstraint(self.tokenizer, CopyAutomaton(r.source, items))
                    return [proc], min(cap, proc.max_tokens)
                except ValueError:  # nothing word-like to copy: fall back to the soft bias
                    pass
            return [CopyBiasProcessor(self.tokenizer, r.source, self.copy_bonus), LineLimitProcessor(self.tokenizer)], cap
        return [LineLimitProcessor(self.tokenizer)], cap

    def _job(self, index: int, prompt: str, is_mc: bool) -> _Job:
        r = route(prompt, is_mc)
        tokens = list(self.tokenizer.encode_dialog_prompt(build_dialog(prompt, r), add_generation_prompt=True))
        processors, grammar, max_new = self._constraint(r)
        truncated = False
        limit = getattr(self.llm, "max_seq_len", None)
        if limit is not None and len(tokens) + max_new > limit:
            # Keep the head (system turn, task instruction) and the tail (candidates, answer cue); cut the middle.
            budget = max(limit - max_new, 2)
            head = budget // 4
            tokens = tokens[:head] + tokens[len(tokens) - (budget - head):]
            truncated = True
        return _Job(index, r, tokens, max_new, processors, grammar, truncated)

    def run(self, prompts: Sequence[str], is_multiple_choice: Sequence[bool],
            on_batch: Callable[[int, int], None] | None = None) -> list[Prediction]:
        """Answer ``prompts``; results come back in input order.

        Every question goes to the decoding core at once, each with its own budget and constraint
        (``Llama.run``): at most the generator's ``max_batch_size`` decode together and a slot is refilled as soon as an answer
        ends, so one-digit answers never wait for free text. ``on_batch(n_questions, n_generated_tokens)`` is
        called as answers finish.
        """
        if len(prompts) != len(is_multiple_choice):
            raise ValueError(f"{len(prompts)} prompts but {len(is_multiple_choice)} is_multiple_choice flags")
        jobs = [self._job(i, p, bool(mc)) for i, (p, mc) in enumerate(zip(prompts, is_multiple_choice))]
        # Longest budgets first: the long answers start early and the short ones fill the slots around them.
        order = sorted(jobs, key=lambda j: -j.max_new)
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p)
        specs = [GenerationSpec(j.tokens, j.max_new, params, processors=tuple(j.processors or ()), skip_special=False,
                                grammar=j.grammar) for j in order]

        def finished(seq: Any) -> None:
            if on_batch is not None:
                on_batch(1, len(seq.generated))

        results: list[Prediction | None] = [None] * len(jobs)
        for job, seq in zip(order, self.llm.run(specs, on_finish=finished)):
            ids = seq.kept_tokens()
            raw = self.tokenizer.decode(ids)
            response = raw if self.constrain or not self.repair else repair_response(
                job.route.task_type, raw, n_items=len(job.route.items) or None, pick=job.route.pick or 3)
            results[job.index] = Prediction(job.route, raw, response, len(job.tokens), len(ids), job.truncated)
        return [r for r in results if r is not None]
