"""From OpenAI requests to engine work, and from engine output to OpenAI response bodies.

Everything here is pure (no I/O): the routes in ``app.py`` call these to validate a request into
``GenerationSpec``s and to shape choices, chunks, logprobs and usage the way OpenAI's clients parse them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..constraints.grammar import Grammar
from ..engine import Delta, GenerationSpec, TokenLogprob
from ..errors import Llama3Error
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .errors import APIError
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from .structured import request_grammar

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP_STRINGS = 16
SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64); negative OpenAI seeds wrap around


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def dialog_from_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the tokenizer's dialog; text content parts are joined, assistant tool calls get their
    arguments parsed (a JSON object each), tool results keep their call id; anything else is a 400."""
    dialog: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = ROLES[message.role]  # the schema admits only these roles
        content = message.content
        if message.tool_calls:
            if role != "assistant":
                raise APIError(400, f"messages[{i}] ({message.role}): only assistant messages carry tool_calls",
                               param=f"messages[{i}].tool_calls")
            entry: dict[str, Any] = {"role": role, "content": _text(content, i) if content is not None else None,
                                     "tool_calls": [_call(call, i, j) for j, call in enumerate(message.tool_calls)]}
            dialog.append(entry)
            continue
        if content is None:
            raise APIError(400, f"messages[{i}] ({message.role}) has no content", param=f"messages[{i}].content")
        entry = {"role": role, "content": _text(content, i)}
        if role == "tool" and message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        dialog.append(entry)
    return dialog


def _text(content: str | list[Any], i: int) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, got {part.type!r}",
                           param=f"messages[{i}].content[{j}].type")
        texts.append(part.text)
    return "".join(texts)


def _call(call: Any, i: int, j: int) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{where} is not valid JSON: {exc}", param=where) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where} must be a JSON object", param=where)
    out: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    if call.id:
        out["id"] = call.id
    return out


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size or str(token) != key.strip():
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        out[token] = float(value)
    return out


def sampling_params(req: SamplingFields, vocab_size: int, seed: int | None) -> SamplingParams:
    """SamplingParams with OpenAI's defaults (temperature 1, top_p 1); library errors become 400s."""
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=logit_bias(req.logit_bias, vocab_size),
            seed=seed,
        )
    except Llama3Error as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


def check_stream_options(req: SamplingFields) -> bool:
    """Whether a final usage chunk was asked for; stream_options without stream is a 400 (as OpenAI)."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def budget(requested: int | None, prompt_len: int, context: int, param: str, prompt_param: str) -> int:
    """Tokens a sequence may generate: what was asked for, checked against what the context leaves."""
    if prompt_len >= context:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens but the context size is {context} tokens "
            f"(the prompt must leave room for at least one generated token); shorten the prompt",
            param=prompt_param, code="context_length_exceeded",
        )
    left = context - prompt_len
    if requested is None:
        return left
    if requested > left:
        raise APIError(
            400,
            f"{param}={requested} is too large: the prompt has {prompt_len} tokens and the context size is {context} "
            f"tokens, so at most {left} tokens can be generated",
            param=param, code="context_length_exceeded",
        )
    return requested


@dataclass
class Plan:
    """A validated request: one spec per (prompt, choice), in the order of the response's choice indices."""

    specs: list[GenerationSpec]
    prompt_tokens: int
    include_usage: bool = False


def plan(req: SamplingFields, prompts: list[list[int]], *, context: int, vocab_size: int,
         max_tokens: int | None, max_param: str, prompt_param: str, logprobs: bool, top_logprobs: int,
         tool_grammar: Grammar | None = None) -> Plan:
    """Specs for ``n`` choices of each prompt. Seeded choices use seed, seed + 1, ... (so each differs but
    every one is reproducible); the same request with the same seed gives the same choices."""
    include_usage = check_stream_options(req)
    stops = stop_strings(req.stop)
    grammar = request_grammar(req)
    if tool_grammar is not None:
        if grammar is not None:
            raise APIError(400, "an output constraint (response_format, guided_*, grammar) and tools cannot be combined "
                           "unless tool_choice is \"none\"", param="tool_choice")
        grammar = tool_grammar
    n = req.n or 1
    specs = []
    for p, prompt in enumerate(prompts):
        name = prompt_param if len(prompts) == 1 else f"{prompt_param}[{p}]"
        limit = budget(max_tokens, len(prompt), context, max_param, name)
        for j in range(n):
            seed = None if req.seed is None else (req.seed + j) % SEED_SPACE
            params = sampling_params(req, vocab_size, seed)
            specs.append(GenerationSpec(prompt=prompt, max_tokens=limit, params=params, stop=stops,
                                        logprobs=logprobs, top_logprobs=top_logprobs, grammar=grammar))
    return Plan(specs, sum(len(p) for p in prompts), include_usage)


def chat_plan(req: ChatCompletionRequest, prompt: list[int], context: int, vocab_size: int,
              tool_grammar: Grammar | None = None) -> Plan:
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    asked, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        if asked is not None and asked != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; send one",
                           param="max_completion_tokens")
        asked, param = req.max_completion_tokens, "max_completion_tokens"
    return plan(req, [prompt], context=context, vocab_size=vocab_size, max_tokens=asked, max_param=param,
                prompt_param="messages", logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
                tool_grammar=tool_grammar)


def completion_plan(req: CompletionRequest, prompts: list[list[int]], context: int, vocab_size: int) -> Plan:
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(400, "best_of is not supported (it may only equal n)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    return plan(req, prompts, context=context, vocab_size=vocab_size, max_tokens=req.max_tokens,
                max_param="max_tokens", prompt_param="prompt", logprobs=req.logprobs is not None,
                top_logprobs=req.logprobs or 0)


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer,
                       vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt. Text is encoded with BOS (when the model uses one) and with special-token
    text treated as plain text, so a prompt can never inject control tokens."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for i, item in enumerate(items):
        name = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = tokenizer.encode(item, bos=tokenizer.bos_id is not None and tokenizer.add_bos, eos=False)
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                               param=name)
        if not ids:
            raise APIError(400, f"{name} is empty", param=name)
        out.append(ids)
    return out


# -- responses ---------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(delta: Delta) -> str | None:
    return delta.finish_reason if delta.finish_reason in ("stop", "length") else None


class LogprobFormatter:
    """Token logprobs in OpenAI's two formats. A generated token's "token" is the text it added to the
    output (so they concatenate to the text exactly); alternatives show each token decoded alone."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tb = self.tokenizer.token_bytes
        return {"content": [
            {"token": e.text, "logprob": e.logprob, "bytes": list(tb(e.token)),
             "top_logprobs": [{"token": self.text(t), "logprob": lp, "bytes": list(tb(t))} for t, lp in e.top]}
            for e in entries
        ], "refusal": None}

    def legacy(self, entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
        """Completions format; ``offset`` is where the first entry's text starts in the choice's text."""
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.text)
        return {
            "tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
