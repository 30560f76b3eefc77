"""Chat templates: a model's Jinja template rendered as Hugging Face does, inside jinja2's sandbox.

A template comes from a downloaded file, so it is untrusted code: it runs in an
``ImmutableSandboxedEnvironment`` (no attribute tricks, no mutation of inputs) that also caps the size of
``*`` and ``**`` results. The environment otherwise matches transformers' ``apply_chat_template``:
trim_blocks, lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, ``tojson`` with HF's
semantics (no HTML escaping, ``ensure_ascii=False``), the special-token variables and
``add_generation_prompt``.

Injection safety: before rendering, every control-token text inside the dialog's strings is swapped
for a private-use marker; after rendering the markers are put back and their spans reported as
*protected*, so the encoder never turns them into control tokens (see ``HFTokenizer``). Benign
dialogs (no control-token text) render exactly as transformers renders them.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError
from .base import Dialog

# Used when a model ships no template: ChatML, the same fallback llama.cpp applies. Its control tokens
# (<|im_start|>, <|im_end|>) are control tokens only if the vocabulary has them; otherwise they are text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Used instead of ChatML when the vocabulary is Llama 3's (a GGUF or tokenizer.json without a template):
# the same ids as Meta's ChatFormat.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def default_chat_template(special_texts: Collection[str]) -> str:
    """The template for a model that ships none: Llama 3's format for a Llama 3 vocabulary, else ChatML."""
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= set(special_texts):
        return LLAMA3_CHAT_TEMPLATE
    return DEFAULT_CHAT_TEMPLATE


MAX_PRODUCT_LEN = 1_000_000  # longest string/list a template may build with * (defends against memory bombs)


class _GenerationTag(jinja2.ext.Extension):
    """HF's ``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; we only render it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise jinja2.exceptions.SecurityError("exponent too large in chat template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_PRODUCT_LEN:
                    raise jinja2.exceptions.SecurityError("chat template builds a value that is too large")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # HF's tojson: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML, which changes prompts).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile (once per source) a chat template in the sandbox; syntax errors become ``TokenizerError``."""
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from None


def render_template(source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                    variables: Mapping[str, Any], tools: list[dict[str, Any]] | None = None) -> str:
    """Render ``source`` for ``messages`` exactly as transformers' ``apply_chat_template(tokenize=False)``."""
    template = compile_template(source)
    context = {**variables, "tools": tools or None, "documents": None}
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.SecurityError as exc:
        raise TokenizerError(f"chat template tried something the sandbox forbids: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise TokenizerError(f"chat template rejected the dialog: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from None


@dataclass
class RenderedChat:
    """A rendered prompt, and where message text sits that must never become a control token.

    ``protected``: (start, end) spans of control-token text that came from messages. ``cuts``: positions no
    control token may straddle (the edges of message text that begin/end with part of a control token,
    and places where the template cut through a marker). ``marked``: False when neither exists, so the
    text can be encoded the ordinary way.
    """

    text: str
    protected: list[tuple[int, int]] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)

    @property
    def marked(self) -> bool:
        return bool(self.protected or self.cuts)


def _pick_markers(strings: Sequence[str], n: int) -> list[str]:
    """``n`` private-use characters that occur in none of ``strings`` (so markers cannot be forged)."""
    used = set().union(*map(set, strings))
    free = list(itertools.islice((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used), n))
    if len(free) < n:
        raise TokenizerError("dialog uses every private-use character; cannot render it safely")
    return free


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, Mapping):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _plain(obj: Any) -> Any:
    """Copy into plain JSON-like values (the template sees no foreign objects); drop None-valued keys as HF does."""
    if obj is None or type(obj) in (str, int, float, bool):
        return obj
    if isinstance(obj, str):  # subclasses (enums...) could carry methods: back to the plain type
        return str.__str__(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    raise TokenizerError(f"dialog contains a {type(obj).__name__}; only strings, numbers, lists and dicts are allowed")


@lru_cache(maxsize=8)
def _control_patterns(controls: tuple[str, ...]) -> tuple[re.Pattern[str] | None, frozenset[str], frozenset[str], int]:
    """Regex for any control text (longest first), and the proper prefixes/suffixes of control texts."""
    ordered = sorted(controls, key=len, reverse=True)
    regex = re.compile("|".join(map(re.escape, ordered))) if ordered else None
    prefixes = frozenset(c[:k] for c in ordered for k in range(1, len(c)))
    suffixes = frozenset(c[k:] for c in ordered for k in range(1, len(c)))
    return regex, prefixes, suffixes, max(map(len, ordered), default=0)


def render_chat(source: str, dialog: Dialog, *, control_texts: Sequence[str], add_generation_prompt: bool,
                continue_final: bool, variables: Mapping[str, Any],
                tools: Sequence[Mapping[str, Any]] | None = None) -> RenderedChat:
    """Render ``dialog`` with ``source``, tracking message text that looks like control tokens (module docstring).

    ``continue_final``: leave the last message open (HF's ``continue_final_message``): render, then cut the
    prompt where that message's text ends.
    """
    messages = [_plain(m) for m in dialog]
    tool_list = [_plain(t) for t in tools or ()]
    control_re, prefixes, suffixes, longest = _control_patterns(tuple(sorted(set(control_texts))))
    opener, closer, cut, cont = _pick_markers(_strings(messages) + _strings(tool_list) + _strings(dict(variables)) + [source], 4)
    originals: list[str] = []

    def substitute(m: re.Match[str]) -> str:
        originals.append(m.group())
        return f"{opener}{len(originals) - 1}{closer}"

    def mark(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: (v if k == "role" else mark(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mark(v) for v in obj]
        if not isinstance(obj, str) or control_re is None:
            return obj
        text = control_re.sub(substitute, obj)
        # Text ending in "<|im_" (or starting with "end|>") could complete a control token with template text.
        if any(obj[-k:] in prefixes for k in range(1, min(longest, len(obj) + 1))):
            text += cut
        if any(obj[:k] in suffixes for k in range(1, min(longest, len(obj) + 1))):
            text = cut + text
        return text

    messages = [mark(m) for m in messages]
    tool_list = [mark(t) for t in tool_list]  # tool descriptions are user text too
    if continue_final:
        # A trailing space after the marker tells us whether the template keeps trailing whitespace (HF's test).
        messages[-1]["content"] = messages[-1]["content"] + cont + " "
    text = render_template(source, messages, add_generation_prompt=add_generation_prompt, variables=variables,
                           tools=tool_list)
    if continue_final:
        at = text.rfind(cont)
        if at < 0:
            raise TokenizerError("chat template drops the final message's text, so that message cannot be continued")
        text = text[:at] if text[at + 1 : at + 2] == " " else text[:at].rstrip()
    return _unmark(text, originals, opener, closer, (cut, cont))


def _unmark(text: str, originals: list[str], opener: str, closer: str, others: tuple[str, ...]) -> RenderedChat:
    """Restore substituted control texts (as protected spans) and turn every other marker into a cut point."""
    marker_re = re.compile(f"{re.escape(opener)}(\\d+){re.escape(closer)}|[{re.escape(opener + closer + ''.join(others))}]")
    out: list[str] = []
    length = 0
    rendered = RenderedChat("")
    last = 0
    for m in marker_re.finditer(text):
        out.append(text[last : m.start()])
        length += m.start() - last
        last = m.end()
        index = m.group(1)
        if index is not None and int(index) < len(originals):
            original = originals[int(index)]
            rendered.protected.append((length, length + len(original)))
            out.append(original)
            length += len(original)
        else:
            rendered.cuts.append(length)
    out.append(text[last:])
    rendered.text = "".join(out)
    return rendered
