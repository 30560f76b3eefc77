"""Meta's ``Llama`` front end (``build``, ``generate``, ``text_completion``, ``chat_completion``) on any device,
for every checkpoint format, plus streaming, stop strings and the sampling knobs of llama.cpp and vLLM."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch

from .assets import default_model_path
from .checkpoint import load_model
from .decoder import DecodeBatch
from .errors import GenerationError
from .model import Transformer
from .sampling import LogitsProcessor, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer

Message = Mapping[str, str]
Dialog = Sequence[Message]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    generation: dict[str, str]
    tokens: list[str]
    logprobs: list[float]


class StopStringWatch:
    """Follows one row's text as tokens arrive and finds the first stop string in it.

    ``releasable`` is the text that can be shown now: it holds back any tail that could still grow into a
    stop string, so a stream never shows the beginning of one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], skip_special: bool = False) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special=skip_special)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.char_ends: list[int] = []  # len(text) after each token, to map a text cut back to tokens
        self.cut: int | None = None  # offset where the first stop string starts

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared."""
        before = len(self.text)
        self.text += self.decoder.push(token)
        self.char_ends.append(len(self.text))
        if self.stop:
            window = max(len(s) for s in self.stop) - 1
            start = max(0, before - window)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.cut = min(hits)
                self.text = self.text[: self.cut]
                return True
        return False

    def finish(self) -> None:
        if self.cut is None:
            self.text += self.decoder.flush()

    def releasable(self, final: bool) -> str:
        if final or self.cut is not None or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[: len(self.text) - hold]

    def tokens_before_cut(self) -> int:
        """How many tokens lie wholly before the stop string."""
        if self.cut is None:
            return len(self.char_ends)
        return sum(1 for end in self.char_ends if end <= self.cut)


class TextStream:
    """Iterator of text increments for one generating row; ``finish_reason`` and ``generated_tokens`` are
    filled in as it runs ("stop", "length", or None while running / when closed early)."""

    def __init__(self, batch: DecodeBatch, watch: StopStringWatch) -> None:
        self.batch, self.watch = batch, watch
        self._chunks = self._run()

    @property
    def finish_reason(self) -> str | None:
        return self.batch.rows[0].finish_reason

    @property
    def generated_tokens(self) -> int:
        return len(self.batch.rows[0].generated)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def _run(self) -> Iterator[str]:
        shown = 0
        while not self.batch.done:
            token = self.batch.step()[0]
            if token is not None and self.watch.push(token):
                self.batch.finish(0, "stop")
            text = self.watch.releasable(final=False)
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
        self.watch.finish()
        if len(self.watch.text) > shown:
            yield self.watch.text[shown:]


class Llama:
    """A loaded model + tokenizer with Meta's generation API."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int, max_batch_size: int, seed: int = 1
    ) -> None:
        if not 1 <= max_seq_len <= model.config.max_seq_len:
            raise GenerationError(
                f"max_seq_len={max_seq_len} must be between 1 and the model's context length {model.config.max_seq_len}"
            )
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.device = model.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.load_seconds: float | None = None
        model.setup_cache(max_batch_size, max_seq_len)

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
    ) -> Llama:
        """Load a checkpoint (Meta dir, Hugging Face dir or .gguf file; None = the default model) and tokenizer.

        The tokenizer is found in the checkpoint when ``tokenizer_path`` is None. ``max_seq_len`` None takes
        ``default_max_seq_len`` or the model's context length, whichever is smaller; an explicit value beyond
        the model's context is an error.
        """
        if model_parallel_size not in (None, 1):
            raise GenerationError(
                f"model_parallel_size={model_parallel_size}: tensor parallelism is not supported yet; "
                "shards are merged and run in one process (model_parallel_size=None)"
            )
        start = time.perf_counter()
        path = Path(ckpt_dir).expanduser() if ckpt_dir is not None else default_model_path()
        torch.manual_seed(seed)  # Meta seeds the global RNG too; anything outside our generator stays reproducible
        model = load_model(path, device=device, dtype=dtype, quantize=quantize)
        tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else path)
        if tokenizer.n_words > model.config.vocab_size:
            raise GenerationError(
                f"tokenizer has {tokenizer.n_words} tokens but the model only {model.config.vocab_size}: "
                "they do not belong together"
            )
        if max_seq_len is None:
            max_seq_len = min(default_max_seq_len, model.config.max_seq_len)
        llm = Llama(model, tokenizer, max_seq_len, max_batch_size, seed)
        llm.load_seconds = time.perf_counter() - start
        return llm

    # -- token level -------------------------------------------------------------------------------------

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if not prompt_tokens:
            raise GenerationError("no prompts given")
        if len(prompt_tokens) > self.max_batch_size:
            raise GenerationError(
                f"batch of {len(prompt_tokens)} prompts exceeds max_batch_size={self.max_batch_size}"
            )
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {i} is empty")
            if len(prompt) >= self.max_seq_len:
                raise GenerationError(
                    f"prompt {i} has {len(prompt)} tokens but the context is max_seq_len={self.max_seq_len} tokens; "
                    "shorten the prompt or build with a larger max_seq_len"
                )
            if any(not 0 <= t < vocab for t in prompt):
                raise GenerationError(f"prompt {i} contains token ids outside the vocabulary [0, {vocab})")

    def _batch(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        sampling: dict[str, Any],
        logprobs: bool,
        echo: bool,
        logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None,
    ) -> DecodeBatch:
        self._check_prompts(prompt_tokens)
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise GenerationError(f"invalid max_gen_len={max_gen_len!r}: must be an integer >= 1")
        if logits_processors is not None and len(logits_processors) != len(prompt_tokens):
            raise GenerationError("logits_processors needs one entry (a list or None) per prompt")
        params = SamplingParams(**sampling)
        generator = self.generator
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        return DecodeBatch(
            self.model,
            prompt_tokens,
            max_gen_len,
            params,
            self.tokenizer.stop_tokens,
            generator=generator,
            processors=logits_processors,
            logprobs=logprobs,
            echo_logprobs=logprobs and echo,
        )

    def _run(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        stop: Sequence[str] | str | None,
        logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None,
        sampling: dict[str, Any],
    ) -> tuple[DecodeBatch, list[StopStringWatch]]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        batch = self._batch(
            prompt_tokens, max_gen_len, dict(temperature=temperature, top_p=top_p, **sampling),
            logprobs, echo, logits_processors,
        )  # fmt: skip
        watches = [StopStringWatch(self.tokenizer, stop) for _ in prompt_tokens]
        while not batch.done:
            for i, token in enumerate(batch.step()):
                if token is not None and watches[i].push(token):
                    batch.finish(i, "stop")
        for watch in watches:
            watch.finish()
        return batch, watches

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
        **sampling: Any,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate for a batch of token prompts with Meta's semantics: per row, the new tokens (or prompt +
        new tokens with ``echo``) up to the first stop token, which is not returned; with ``logprobs`` the
        log-probability of each returned token under the model (position j scored by the logits at j-1).

        Extra keywords: ``top_k``, ``min_p``, ``repetition_penalty``, ``presence_penalty``,
        ``frequency_penalty``, ``logit_bias``, ``seed``; ``stop`` strings also end a row (not returned).
        """
        batch, watches = self._run(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop, logits_processors, sampling
        )
        out_tokens, out_logprobs = [], []
        for row, watch in zip(batch.rows, watches):
            keep = watch.tokens_before_cut()
            tokens, probs = row.generated[:keep], row.logprobs[:keep]
            if echo:
                tokens = row.prompt + tokens
                probs = [0.0] + row.prompt_logprobs + probs if logprobs else probs
            out_tokens.append(tokens)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

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
        """Answer each dialog as the assistant -> ``[{"generation": {"role": "assistant", "content": str}}]``."""
        prompt_tokens = [self.tokenizer.encode_dialog_prompt(d) for d in dialogs]
        results: list[ChatPrediction] = []
        for text, tokens, probs in self._texts(prompt_tokens, temperature, top_p, max_gen_len, logprobs, False, kwargs):
            pred = self._prediction(text, tokens, probs, logprobs)
            results.append({**pred, "generation": {"role": "assistant", "content": pred["generation"]}})
        return results

    def _encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise GenerationError(f"prompts must be strings, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None, eos=False)

    def _texts(self, prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo, kwargs):
        stop = kwargs.pop("stop", None)
        processors = kwargs.pop("logits_processors", None)
        batch, watches = self._run(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop, processors, kwargs
        )
        for row, watch in zip(batch.rows, watches):
            keep = watch.tokens_before_cut()
            tokens, probs = row.generated[:keep], row.logprobs[:keep]
            text = watch.text
            if echo:
                text = self.tokenizer.decode(row.prompt) + text
                tokens = row.prompt + tokens
                probs = ([0.0] + row.prompt_logprobs + probs) if logprobs else probs
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
        **sampling: Any,
    ) -> TextStream:
        """Text increments for one prompt as tokens are generated (never half a UTF-8 character nor the
        beginning of a stop string). Stop iterating (or ``close()``) to stop generation early."""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        batch = self._batch(
            [prompt_tokens], max_gen_len, dict(temperature=temperature, top_p=top_p, **sampling), False, False,
            [logits_processors] if logits_processors else None,
        )  # fmt: skip
        return TextStream(batch, StopStringWatch(self.tokenizer, stop, skip_special=True))

    def stream_completion(self, prompt: str, **kwargs: Any) -> TextStream:
        """``stream`` for a text prompt (BOS added)."""
        return self.stream(self._encode_prompt(prompt), **kwargs)

    def stream_chat(self, dialog: Dialog, **kwargs: Any) -> TextStream:
        """``stream`` for a dialog, answered as the assistant."""
        return self.stream(self.tokenizer.encode_dialog_prompt(dialog), **kwargs)
