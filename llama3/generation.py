"""Meta's ``Llama`` front end (``build``, ``generate``, ``text_completion``, ``chat_completion``) on any device,
for every checkpoint format, plus streaming, stop strings, the sampling knobs of llama.cpp and vLLM, and ``run``
for any number of sequences at once: a thin driver of the decoding core (``scheduler.Scheduler``)."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch

from .assets import default_model_path
from .checkpoint import load_model
from .constraints.grammar import Grammar
from .errors import GenerationError
from .model import Transformer
from .sampling import LogitsProcessor, SamplingParams
from .scheduler import Scheduler
from .sequence import GenerationSpec
from .sequence import Sequence as Generation
from .tokenizer import Tokenizer, load_tokenizer
from .tools import parse_tool_choice, parse_tools, read_tool_calls, tool_grammar

Message = Mapping[str, str]
Dialog = Sequence[Message]
SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    generation: dict[str, str]
    tokens: list[str]
    logprobs: list[float]


class TextStream:
    """Iterator of text increments for one generating sequence; ``finish_reason`` and ``generated_tokens``
    are filled in as it runs ("stop", "length", or None while running / when closed early)."""

    def __init__(self, llm: Llama, seq: Generation) -> None:
        self.llm, self.seq = llm, seq
        self._chunks = self._run()

    @property
    def finish_reason(self) -> str | None:
        return self.seq.finish_reason if self.seq.finish_reason in ("stop", "length") else None

    @property
    def generated_tokens(self) -> int:
        return len(self.seq.generated)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def _run(self) -> Iterator[str]:
        try:
            while not self.seq.done:
                self.llm.scheduler.step()
                text, _ = self.seq.take_delta()
                if text:
                    yield text
            self.llm._raise_if_failed([self.seq])
            text, _ = self.seq.take_delta()
            if text:
                yield text
        finally:  # closed early: the sequence leaves its slot at once
            self.llm.scheduler.remove([self.seq])


def _join_world(model_parallel_size: int | None, device: str | torch.device | None):
    """The tensor-parallel job this process belongs to (``llama3.parallel.world``), or None for one process.

    Under torchrun every process of the job shares the model (``model_parallel_size`` None means all of them,
    as in Meta's reference); outside it, ``model_parallel_size`` > 1 is an error that says how to launch."""
    from .parallel.world import init_world, launched_size

    size = launched_size()
    if model_parallel_size is not None and (not isinstance(model_parallel_size, int) or model_parallel_size < 1):
        raise GenerationError(f"model_parallel_size={model_parallel_size!r} must be an integer >= 1")
    if model_parallel_size is not None and model_parallel_size != size:
        raise GenerationError(
            f"model_parallel_size={model_parallel_size} but this job has {size} process(es): start one process per "
            f"model-parallel rank, e.g. torchrun --nproc-per-node {model_parallel_size} your_script.py"
        )
    if size <= 1:
        return None
    return init_world(device)


class Llama:
    """A loaded model + tokenizer with Meta's generation API, over one decoding core (``self.scheduler``).

    ``prefix_cache``: a new prompt that starts with what a free KV-cache slot already holds (the previous turn
    of a chat, a shared instruction) prefills only the rest, with the same numbers as a cold prefill.
    ``prompt_lookup``: up to this many draft tokens per decode step, copied from the sequence's own context and
    verified in the same step (``llama3.lookup``); the output is unchanged, only sooner. 0 (default): off.
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int, max_batch_size: int, seed: int = 1,
        *, prefix_cache: bool = True, prompt_lookup: int = 0,
    ) -> None:
        if not 1 <= max_seq_len <= model.config.max_seq_len:
            raise GenerationError(
                f"max_seq_len={max_seq_len} must be between 1 and the model's context length {model.config.max_seq_len}"
            )
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.world = getattr(model, "world", None)  # the tensor-parallel job the model is shared in, if any
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.device = model.device
        self._seeds = random.Random(seed)  # per-sequence seeds of calls that pass none
        self.load_seconds: float | None = None
        self.stop_tokens = frozenset(tokenizer.stop_tokens)
        # No other streams wait on this driver's steps, so every admitted prompt is prefilled before the next
        # decode step (all rows then decode together, the cheapest order); chunks stay at fixed offsets.
        self.scheduler = Scheduler(model, max_batch_size=max_batch_size, max_seq_len=max(2, max_seq_len),
                                   prefix_cache=prefix_cache, tokens_per_step=max_batch_size * max_seq_len,
                                   prompt_lookup=prompt_lookup)

    @staticmethod
    def build(
        ckpt_dir: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 4,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = "auto",
        default_max_seq_len: int = 2048,
        prefix_cache: bool = True,
        lora: str | Path | None = None,
        prompt_lookup: int = 0,
        compile: bool = False,
    ) -> Llama:
        """Load a checkpoint (Meta dir, Hugging Face dir or .gguf file; None = the default model) and tokenizer.

        The tokenizer is found in the checkpoint when ``tokenizer_path`` is None. ``max_seq_len`` None takes
        ``default_max_seq_len`` or the model's context length, whichever is smaller; an explicit value beyond
        the model's context is an error. ``lora``: a LoRA adapter directory (PEFT's format) applied to every
        generation. ``prompt_lookup``: draft tokens per step for prompt-lookup decoding (0 = off; see ``Llama``).
        ``compile``: decode steps through one ``torch.compile``d graph (``llama3.compiled``; CUDA graphs on a GPU),
        unless the model has its own decode kernel (quantized CPU models).
        """
        start = time.perf_counter()
        path = Path(ckpt_dir).expanduser() if ckpt_dir is not None else default_model_path()
        torch.manual_seed(seed)  # Meta seeds the global RNG too; anything outside our generator stays reproducible
        world = _join_world(model_parallel_size, device)
        if world is None:
            model = load_model(path, device=device, dtype=dtype, quantize=quantize)
        else:
            from .parallel.loader import load_parallel_model

            if lora is not None or compile:
                raise GenerationError("LoRA adapters and compile are not supported with tensor parallelism yet")
            model = load_parallel_model(path, world, dtype, quantize=quantize)
        if lora is not None:
            from .lora import adapters, load_adapter

            load_adapter(model, Path(lora).expanduser(), "default")
            adapters(model).use("default")
        if compile:
            from . import compiled

            compiled.enable(model)
        tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else path)
        if tokenizer.n_words > model.config.vocab_size:
            raise GenerationError(
                f"tokenizer has {tokenizer.n_words} tokens but the model only {model.config.vocab_size}: "
                "they do not belong together"
            )
        if max_seq_len is None:
            max_seq_len = min(default_max_seq_len, model.config.max_seq_len)
        llm = Llama(model, tokenizer, max_seq_len, max_batch_size, seed, prefix_cache=prefix_cache,
                    prompt_lookup=prompt_lookup)
        llm.load_seconds = time.perf_counter() - start
        return llm

    # -- the core ----------------------------------------------------------------------------------------

    def sequence(self, spec: GenerationSpec, *, tag: object = None) -> Generation:
        """A sequence for ``spec`` with its own generator: seeded by ``spec.params.seed``, else drawn from this
        ``Llama``'s seed source (so a run is reproducible from ``Llama.build``'s ``seed``)."""
        seed = spec.params.seed if spec.params.seed is not None else self._seeds.getrandbits(63)
        generator = torch.Generator(self.device).manual_seed(seed % SEED_SPACE)
        return Generation(spec, self.tokenizer, generator, self.stop_tokens, tag=tag)

    def run(self, specs: Sequence[GenerationSpec], *, on_finish=None) -> list[Generation]:
        """Generate every spec with continuous batching (any number: at most ``max_batch_size`` decode at once,
        slots refilled as sequences finish); the finished sequences, in order. ``on_finish(seq)`` is called as
        each one ends. A sequence failing raises ``GenerationError`` after the others are dropped."""
        seqs = [self.sequence(spec, tag=i) for i, spec in enumerate(specs)]
        self.scheduler.add_all(seqs, [f"prompt {i}" for i in range(len(seqs))])
        try:
            left = len(seqs)
            while left:
                for seq in self.scheduler.step():
                    if seq.done and seq.tag is not None and seqs[seq.tag] is seq:
                        left -= 1
                        self._raise_if_failed([seq])
                        if on_finish is not None:
                            on_finish(seq)
        finally:
            self.scheduler.remove(seqs)  # after an error or an interrupt, nothing of this call keeps running
        return seqs

    def _raise_if_failed(self, seqs: Sequence[Generation]) -> None:
        for seq in seqs:
            if seq.finish_reason == "error":
                if seq.error_kind == "request":
                    raise GenerationError(seq.error)
                raise RuntimeError(seq.error)

    # -- token level -------------------------------------------------------------------------------------

    def _specs(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        sampling: dict[str, Any],
        logprobs: bool,
        echo: bool,
        stop: Sequence[str] | str | None,
        logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None,
        skip_special: bool = False,
        response_format: Mapping[str, Any] | Grammar | None = None,
    ) -> list[GenerationSpec]:
        """Meta's batch rules: at most ``max_batch_size`` prompts, each shorter than ``max_seq_len``; each row
        generates up to ``max_gen_len`` tokens or what the context leaves. Seeded calls give row i seed + i."""
        if not prompt_tokens:
            raise GenerationError("no prompts given")
        if len(prompt_tokens) > self.max_batch_size:
            raise GenerationError(f"batch of {len(prompt_tokens)} prompts exceeds max_batch_size={self.max_batch_size}")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 1:
            raise GenerationError(f"invalid max_gen_len={max_gen_len!r}: must be an integer >= 1")
        if logits_processors is not None and len(logits_processors) != len(prompt_tokens):
            raise GenerationError("logits_processors needs one entry (a list or None) per prompt")
        params = SamplingParams(**sampling)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        processors = logits_processors or [None] * len(prompt_tokens)
        grammar = response_format if isinstance(response_format, Grammar) else Grammar.from_response_format(response_format)
        specs = []
        for i, prompt in enumerate(prompt_tokens):
            row = params if params.seed is None else replace(params, seed=(params.seed + i) % SEED_SPACE)
            # Prompts are validated by the scheduler (Llama.run); a too-long one fails there, before its budget.
            specs.append(GenerationSpec(
                prompt=list(prompt), max_tokens=min(max_gen_len, self.max_seq_len - len(prompt)), params=row,
                stop=stops, logprobs=logprobs, processors=tuple(processors[i] or ()),
                echo_logprobs=logprobs and echo, skip_special=skip_special, grammar=grammar,
            ))  # fmt: skip
        return specs

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        stop: Sequence[str] | str | None = None,
        logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
        response_format: Mapping[str, Any] | Grammar | None = None,
        **sampling: Any,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate for a batch of token prompts with Meta's semantics: per row, the new tokens (or prompt +
        new tokens with ``echo``) up to the first stop token, which is not returned; with ``logprobs`` the
        log-probability of each returned token under the model (position j scored by the logits at j-1).

        Extra keywords: ``top_k``, ``min_p``, ``repetition_penalty``, ``presence_penalty``,
        ``frequency_penalty``, ``logit_bias``, ``seed``; ``stop`` strings also end a row (not returned);
        ``response_format`` (OpenAI's ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
        {"schema": ...}}``, or a ``llama3.Grammar``) constrains every row while it is generated.
        """
        seqs = self.run(self._specs(prompt_tokens, max_gen_len, dict(temperature=temperature, top_p=top_p, **sampling),
                                    logprobs, echo, stop, logits_processors, response_format=response_format))
        out_tokens, out_logprobs = [], []
        for seq in seqs:
            tokens, probs = self._kept(seq, echo, logprobs)
            out_tokens.append(tokens)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

    @staticmethod
    def _kept(seq: Generation, echo: bool, logprobs: bool) -> tuple[list[int], list[float]]:
        """Meta's returned ids and logprobs of one row: before any stop string, prompt included with echo."""
        tokens = seq.kept_tokens()
        probs = [e.logprob for e in seq.entries[: len(tokens)]]
        if echo:
            tokens = list(seq.spec.prompt) + tokens
            probs = [0.0] + seq.prompt_logprobs + probs if logprobs else probs
        return tokens, probs

    # -- text level --------------------------------------------------------------------------------------

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        **kwargs: Any,
    ) -> list[CompletionPrediction]:
        """Complete each prompt (encoded with BOS, without EOS) -> ``[{"generation": str, ...}]``."""
        prompt_tokens = [self._encode_prompt(p) for p in prompts]
        return [
            self._prediction(text, tokens, probs, logprobs)
            for text, tokens, probs in self._texts(prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo, kwargs)
        ]

    def chat_completion(
        self,
        dialogs: Sequence[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        **kwargs: Any,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant -> ``[{"generation": {"role": "assistant", "content": str}}]``.

        ``tools`` (OpenAI's list of function tools) are offered in the model's own format; ``tool_choice``
        ("auto", "required", "none" or ``{"type": "function", "function": {"name": ...}}``) says whether it must
        call one, held to the functions' schemas while decoding. A call comes back as ``"tool_calls": [{"id",
        "type": "function", "function": {"name", "arguments": dict}}]`` (content ""), ready to append to the
        dialog with the tool's answer as a ``{"role": "tool", "tool_call_id", "content"}`` message.
        """
        tools = parse_tools(kwargs.pop("tools")) if kwargs.get("tools") is not None else []
        kwargs.pop("tools", None)
        choice = parse_tool_choice(kwargs.pop("tool_choice", None), tools)
        parallel = kwargs.pop("parallel_tool_calls", True)
        grammar = tool_grammar(tools, choice, parallel=parallel)
        if grammar is not None:
            if kwargs.get("response_format") is not None:
                raise GenerationError("response_format and tools cannot be combined unless tool_choice is 'none'")
            kwargs["response_format"] = grammar
        prompt_tokens = [self.tokenizer.encode_dialog_prompt(d, tools=tools or None) for d in dialogs]
        results: list[ChatPrediction] = []
        for text, tokens, probs in self._texts(prompt_tokens, temperature, top_p, max_gen_len, logprobs, False, kwargs):
            pred = self._prediction(text, tokens, probs, logprobs)
            message: dict[str, Any] = {"role": "assistant", "content": pred["generation"]}
            calls = read_tool_calls(text, tools) if choice.mode != "none" else None
            if calls:
                message = {"role": "assistant", "content": "",
                           "tool_calls": [{"id": c.id, "type": "function",
                                           "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
            results.append({**pred, "generation": message})
        return results

    def _encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise GenerationError(f"prompts must be strings, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None, eos=False)

    def _texts(self, prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo, kwargs):
        stop = kwargs.pop("stop", None)
        processors = kwargs.pop("logits_processors", None)
        response_format = kwargs.pop("response_format", None)
        specs = self._specs(prompt_tokens, max_gen_len, dict(temperature=temperature, top_p=top_p, **kwargs),
                            logprobs, echo, stop, processors, response_format=response_format)
        for seq in self.run(specs):
            tokens, probs = self._kept(seq, echo, logprobs)
            text = (self.tokenizer.decode(list(seq.spec.prompt)) if echo else "") + seq.text
            yield text, tokens, probs

    def _prediction(self, text: str, tokens: list[int], probs: list[float], logprobs: bool) -> dict[str, Any]:
        if not logprobs:
            return {"generation": text}
        return {"generation": text, "tokens": [self.tokenizer.decode([t]) for t in tokens], "logprobs": probs}

    # -- streaming ---------------------------------------------------------------------------------------

    def stream(
        self,
        prompt_tokens: Sequence[int],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        stop: Sequence[str] | str | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        response_format: Mapping[str, Any] | Grammar | None = None,
        **sampling: Any,
    ) -> TextStream:
        """Text increments for one prompt as tokens are generated (never half a UTF-8 character nor the
        beginning of a stop string). Stop iterating (or ``close()``) to stop generation early."""
        (spec,) = self._specs([prompt_tokens], max_gen_len, dict(temperature=temperature, top_p=top_p, **sampling),
                              False, False, stop, [logits_processors] if logits_processors else None, skip_special=True,
                              response_format=response_format)
        seq = self.sequence(spec)
        self.scheduler.add(seq, "prompt 0")
        return TextStream(self, seq)

    def stream_completion(self, prompt: str, **kwargs: Any) -> TextStream:
        """``stream`` for a text prompt (BOS added)."""
        return self.stream(self._encode_prompt(prompt), **kwargs)

    def embed(self, texts: Sequence[str], *, pooling: str = "mean", truncate: bool = False) -> torch.Tensor:
        """(len(texts), dim) L2-normalised embeddings: the model's final hidden states pooled over each text
        (``pooling`` "mean" or "last"), computed without disturbing generation's KV cache. A text longer than
        ``max_seq_len`` tokens is an ``EmbeddingError`` unless ``truncate``."""
        from .embedding import LlamaEmbedder, check_lengths, embed

        embedder = LlamaEmbedder(self.model, self.tokenizer, pooling=pooling, max_tokens=self.max_seq_len)
        ids = check_lengths(embedder.tokenize(list(texts)), embedder.max_tokens, truncate)
        return embed(embedder, ids).vectors

    def rag_answer(self, question: str, db: str | Path, *, k: int = 4, min_score: float = 0.3,
                   max_gen_len: int = 256, **kwargs: Any):
        """Answer ``question`` from the store ``db`` (built by ``llama3 rag index``), citing its chunks as [n]:
        a ``llama3.rag.answer.RagAnswer`` (text, sources, cited numbers, chunks left out for lack of context)."""
        from .rag.answer import rag_answer
        from .rag.embedders import open_store

        store, embedder = open_store(db, load_llm=lambda: self)
        try:
            return rag_answer(self, store, embedder, question, k=k, min_score=min_score, max_gen_len=max_gen_len,
                              **kwargs)
        finally:
            store.close()

    def stream_chat(self, dialog: Dialog, **kwargs: Any) -> TextStream:
        """``stream`` for a dialog, answered as the assistant."""
        return self.stream(self.tokenizer.encode_dialog_prompt(dialog), **kwargs)
