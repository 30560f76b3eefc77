"""``ShopBenchModel``: answer ShopBench prompts with a local model, in batches, with constrained decoding.

Each prompt is routed (:mod:`.router`), wrapped in its task type's system instruction (and few-shot examples,
:mod:`.examples`) in the model's chat format, and answered through the decoding core with continuous batching
(``Llama.run``). A :class:`Recipe` says how each task type is answered:

- *generate* under a constraint (the default of ``constrain=True``): one offered digit for multiple-choice (a
  grammar, through llguidance), a permutation of the listed items for ranking, N distinct listed items for
  retrieval, phrases copied from the query for NER and from the review for extractive generation
  (``copy_mode="strict"``; ``"bias"`` only favours the source's tokens), one line for other generation.
  Distinct items and copied phrases are byte automata of our own (``llama3.constraints``): a grammar could
  state them only by listing every permutation or every phrase of the source. With constraints off, the
  seed's regex post-processing repairs the free-form answer.
- *score* the options instead (multiple-choice, ranking, retrieval): the log-likelihood of each option's label
  or text as the answer (``GenerationSpec.options``: one prefill of the prompt, every option a branch of it in
  one batched pass), summed or averaged per token; the best option is the answer, items are ranked or picked
  by score.
- *chain of thought* first (``Recipe.cot``): the model reasons in at most ``cot_tokens`` tokens, then the answer
  is produced after a fixed cue under the same constraint or scoring as without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from ...constraints import (AutomatonConstraint, CopyAutomaton, CopyBiasProcessor, Grammar, LineLimitProcessor,
                            NumberListAutomaton)
from ...sampling import SamplingParams
from ...sequence import GenerationSpec
from .examples import ExamplePool, gold_answer
from .parsing import repair_response
from .prompts import COT_CUE, build_dialog
from .router import Route, route

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "SCORINGS", "Prediction", "Recipe", "ShopBenchModel"]

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

# How multiple-choice, ranking and retrieval answers are chosen: "generate" (constrained decoding), or the
# options' log-likelihood: of the "label" (the digit or item number), of the "text" (summed over its tokens) or
# "text-mean" (per token, length-normalised). Without option texts in the prompt, text scoring scores labels.
SCORINGS = ("generate", "label", "text", "text-mean")
SCORED_TYPES = ("multiple-choice", "ranking", "retrieval")


@dataclass(frozen=True)
class Recipe:
    """How questions are answered; recorded in the report. The defaults are the best configuration measured on
    the development set (benchmarks/shopbench_recipes.py, benchmarks/README.md "ShopBench answers")."""

    choice: str = "text"  # multiple-choice: one of SCORINGS
    lists: str = "generate"  # ranking and retrieval: one of SCORINGS
    entities: str = "spans"  # NER: "generate" (copy phrases under a constraint) or "spans" (score the source's)
    cot: frozenset[str] = frozenset()  # task types answered after a chain of thought
    cot_tokens: int = 96  # most reasoning tokens before the answer cue
    shots: int = 0  # few-shot examples per question, from the example pool

    def __post_init__(self) -> None:
        for name in ("choice", "lists"):
            if getattr(self, name) not in SCORINGS:
                raise ValueError(f"{name} must be one of {', '.join(SCORINGS)}, got {getattr(self, name)!r}")
        if self.entities not in ("generate", "spans"):
            raise ValueError(f"entities must be generate or spans, got {self.entities!r}")
        unknown = set(self.cot) - {"multiple-choice", "ranking", "retrieval", "named_entity_recognition", "generation"}
        if unknown:
            raise ValueError(f"unknown task type(s) for chain of thought: {', '.join(sorted(unknown))}")
        if self.cot_tokens < 1 or self.shots < 0:
            raise ValueError(f"cot_tokens must be >= 1 and shots >= 0 (got {self.cot_tokens}, {self.shots})")

    def scoring(self, task_type: str) -> str:
        """The scoring of ``task_type`` ("generate" for free text)."""
        if task_type == "multiple-choice":
            return self.choice
        if task_type == "named_entity_recognition":
            return self.entities
        return self.lists if task_type in ("ranking", "retrieval") else "generate"

    def as_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "lists": self.lists, "entities": self.entities, "cot": sorted(self.cot), "cot_tokens": self.cot_tokens,
                "shots": self.shots}


def source_spans(source: str, longest: int = 3, most: int = 64) -> list[str]:
    """The phrases an entity answer may be: every run of 1 to ``longest`` words of ``source`` (punctuation
    around a run dropped), shortest first, each once, at most ``most``."""
    words = [w.strip(".,;:!?\"'()[]") for w in source.split()]
    spans: list[str] = []
    for n in range(1, longest + 1):
        for i in range(len(words) - n + 1):
            span = " ".join(w for w in words[i : i + n] if w)
            if span and span not in spans:
                spans.append(span)
    return spans[:most]


@dataclass
class Prediction:
    """What the model did with one prompt."""

    route: Route
    raw: str  # the decoded generation (after the reasoning, with chain of thought), or the scored choice
    response: str  # the answer handed to the official parser: raw, or repaired when unconstrained
    prompt_tokens: int
    generated_tokens: int
    truncated: bool = False  # the prompt was cut in the middle to fit max_seq_len
    reasoning: str | None = None  # the chain of thought, when the recipe asks for one
    option_scores: list[float] | None = None  # with scoring: one score per option / item, in label order
    examples: list[int] = field(default_factory=list)  # line numbers of the few-shot examples shown


@dataclass
class _Job:
    index: int
    route: Route
    tokens: list[int]
    max_new: int
    processors: list[Callable[..., Any]] | None
    grammar: Grammar | None
    truncated: bool
    scoring: str = "generate"
    labels: tuple[Any, ...] = ()  # what each scored option answers (a label; a phrase for NER spans)
    options: list[list[int]] = field(default_factory=list)  # their token ids as answers
    reasoning: str | None = None
    reasoning_tokens: int = 0
    examples: list[int] = field(default_factory=list)
    shared: int = 0  # leading tokens shared with other questions (GenerationSpec.shared_prefix)
    prompt_tokens: int = 0  # the question's chat prompt, before any reasoning is appended


class ShopBenchModel:
    """The seed's interface (``predict`` / ``batch_predict``) over a ``llama3.Llama`` generator."""

    def __init__(self, llm: Any, *, batch_size: int = 16, constrain: bool = True, repair: bool = True,
                 temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: Mapping[str, int] | None = None,
                 copy_mode: str = "strict", copy_bonus: float = 5.0, ner_max_items: int = 3,
                 recipe: Recipe | None = None, examples: ExamplePool | None = None) -> None:
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
        # Without constraints every answer is free text repaired afterwards: nothing is scored.
        recipe = recipe or Recipe()
        self.recipe = recipe if constrain else replace(recipe, choice="generate", lists="generate",
                                                       entities="generate")
        limit = getattr(llm, "max_seq_len", None)
        if self.recipe.cot and limit is not None and self.recipe.cot_tokens > limit // 2:
            raise ValueError(f"cot_tokens={self.recipe.cot_tokens} leaves too little of the context "
                             f"(max_seq_len={limit}) for the question: at most {limit // 2}")
        if self.recipe.shots and (examples is None or not len(examples)):
            raise ValueError(f"shots={self.recipe.shots} needs a pool of labelled examples")
        self.examples = examples
        self._prefixes: dict[tuple[Any, ...], list[int]] = {}  # token ids of the turns before each question

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

    # -- constraints and scoring ----------------------------------------------------------------

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

    def _scored_options(self, r: Route, scoring: str) -> tuple[tuple[Any, ...], list[list[int]]]:
        """The labels a scored answer chooses among and each one's answer tokens (empty: generate instead)."""
        if r.task_type == "named_entity_recognition":
            spans = source_spans(r.source) if scoring == "spans" and r.source else []
            return tuple(spans), [self.tokenizer.encode(x, bos=False, eos=False) for x in spans]
        labels = r.options if r.task_type == "multiple-choice" else r.items
        if scoring == "generate" or not labels:
            return (), []
        if scoring != "label" and len(r.texts) == len(labels) and all(r.texts):
            answers = list(r.texts)
        else:  # no option texts in the prompt (a rating scale): score the labels
            answers = [str(n) for n in labels]
        return tuple(labels), [self.tokenizer.encode(a, bos=False, eos=False) for a in answers]

    def _dialog_tokens(self, prompt: str, r: Route, cot: bool) -> tuple[list[int], int, list[int]]:
        """The chat prompt's token ids, how many of them come before the question (the system turn and the
        examples: shared with other questions, so declared to the prefix cache), and the examples' lines."""
        shots = self.examples.pick(prompt, r.task_type, self.recipe.shots) if self.recipe.shots else []
        dialog = build_dialog(prompt, r, examples=[(q.prompt, gold_answer(q)) for q in shots], cot=cot)
        tokens = list(self.tokenizer.encode_dialog_prompt(dialog, add_generation_prompt=True))
        key = tuple((turn["role"], turn["content"]) for turn in dialog[:-1])
        if key not in self._prefixes:
            self._prefixes[key] = list(self.tokenizer.encode_dialog_prompt(dialog[:-1], add_generation_prompt=False))
        before = self._prefixes[key]
        shared = 0
        while shared < min(len(before), len(tokens)) and before[shared] == tokens[shared]:
            shared += 1
        return tokens, shared, [q.line for q in shots]

    def _job(self, index: int, prompt: str, is_mc: bool) -> _Job:
        r = route(prompt, is_mc)
        cot = r.task_type in self.recipe.cot
        tokens, shared, shown = self._dialog_tokens(prompt, r, cot)
        scoring = self.recipe.scoring(r.task_type)
        labels, options = self._scored_options(r, scoring)
        processors, grammar, max_new = self._constraint(r)
        if options:
            processors, grammar, max_new = None, None, max(len(o) for o in options)
        # Room for the reasoning and its cue before the answer.
        reserve = max_new + (self.recipe.cot_tokens + len(self._cue) if cot else 0)
        truncated = False
        limit = getattr(self.llm, "max_seq_len", None)
        if limit is not None and len(tokens) + reserve > limit:
            # Keep the head (system turn, task instruction) and the tail (candidates, answer cue); cut the middle.
            budget = max(limit - reserve, 2)
            head = budget // 4
            tokens = tokens[:head] + tokens[len(tokens) - (budget - head):]
            shared = min(shared, head)
            truncated = True
        return _Job(index, r, tokens, max_new, processors, grammar, truncated, scoring if options else "generate",
                    labels, options, examples=shown, shared=shared, prompt_tokens=len(tokens))

    @cached_property
    def _cue(self) -> list[int]:
        return self.tokenizer.encode(COT_CUE, bos=False, eos=False)

    # -- batched answering ----------------------------------------------------------------------

    def _reason(self, jobs: list[_Job], params: SamplingParams) -> None:
        """Chain of thought: generate each job's reasoning, then append it and the answer cue to its prompt."""
        if not jobs:
            return
        specs = [GenerationSpec(j.tokens, self.recipe.cot_tokens, params, skip_special=False, shared_prefix=j.shared)
                 for j in jobs]
        cue = self._cue
        for job, seq in zip(jobs, self.llm.run(specs)):
            ids = seq.kept_tokens()
            job.reasoning = self.tokenizer.decode(ids)
            job.reasoning_tokens = len(ids)
            job.tokens = job.tokens + list(ids) + cue

    def run(self, prompts: Sequence[str], is_multiple_choice: Sequence[bool],
            on_batch: Callable[[int, int], None] | None = None) -> list[Prediction]:
        """Answer ``prompts``; results come back in input order.

        Every question goes to the decoding core at once, each with its own budget and constraint or options
        (``Llama.run``): at most the generator's ``max_batch_size`` run together and a slot is refilled as soon
        as an answer ends, so one-digit answers never wait for free text. With chain of thought, the reasoning
        of those questions is generated first. ``on_batch(n_questions, n_generated_tokens)`` is called as
        answers finish.
        """
        if len(prompts) != len(is_multiple_choice):
            raise ValueError(f"{len(prompts)} prompts but {len(is_multiple_choice)} is_multiple_choice flags")
        jobs = [self._job(i, p, bool(mc)) for i, (p, mc) in enumerate(zip(prompts, is_multiple_choice))]
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p)
        self._reason([j for j in jobs if j.route.task_type in self.recipe.cot], params)
        # Longest budgets first: the long answers start early and the short ones fill the slots around them.
        order = sorted(jobs, key=lambda j: -j.max_new if not j.options else 0)
        specs = [GenerationSpec(j.tokens, j.max_new, params, processors=tuple(j.processors or ()), skip_special=False,
                                grammar=j.grammar, options=j.options, shared_prefix=j.shared) for j in order]

        def finished(seq: Any) -> None:
            if on_batch is not None:
                on_batch(1, len(seq.generated))

        results: list[Prediction | None] = [None] * len(jobs)
        for job, seq in zip(order, self.llm.run(specs, on_finish=finished)):
            results[job.index] = self._prediction(job, seq)
        return [r for r in results if r is not None]

    def _prediction(self, job: _Job, seq: Any) -> Prediction:
        scores = None
        if job.options:
            logprobs = seq.option_logprobs
            scores = [sum(lp) / len(lp) if job.scoring == "text-mean" else sum(lp) for lp in logprobs]
            # Best first; ties keep label order.
            ranked = [job.labels[i] for i in sorted(range(len(scores)), key=lambda i: -scores[i])]
            kind = job.route.task_type
            if kind in ("multiple-choice", "named_entity_recognition"):
                ranked = ranked[:1]
            elif kind == "retrieval":
                ranked = ranked[: job.route.pick or 3]
            raw = response = ",".join(map(str, ranked))
            generated = 0
        else:
            ids = seq.kept_tokens()
            raw = self.tokenizer.decode(ids)
            response = raw if self.constrain or not self.repair else repair_response(
                job.route.task_type, raw, n_items=len(job.route.items) or None, pick=job.route.pick or 3)
            generated = len(ids)
        return Prediction(job.route, raw, response, job.prompt_tokens, generated + job.reasoning_tokens, job.truncated,
                          reasoning=job.reasoning, option_scores=scores, examples=job.examples)
