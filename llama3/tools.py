"""Tool (function) calling: the tools a chat offers, the grammar a call follows, and reading calls back.

A call is written as Llama 3.1 was trained to write custom tool calls: one JSON object
``{"name": <function name>, "parameters": {<argument>: <value>}}``, several separated by ``"; "`` when parallel
calls are allowed (vLLM's ``llama3_json`` reading). While decoding, a grammar holds the model to that shape with
each function's own JSON schema for its arguments: ``tool_choice`` "required" or a named function allows only
calls; "auto" allows a call or an ordinary answer (one that does not start with ``{``); "none" constrains nothing.

How tools reach the prompt is the tokenizer's business: Meta's tokenizer writes Llama 3.1's own format, a chat
template that knows ``tools`` renders them, and for a template that does not, :func:`plain_tool_dialog`
describes them in the system message and turns calls and results into ordinary turns.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constraints.grammar import JSON_STYLE, Grammar
from .errors import GenerationError

PYTHON_TAG = "<|python_tag|>"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ToolError(GenerationError):
    """Tools, a tool choice or a tool message that cannot be used (the message names which)."""


@dataclass(frozen=True)
class Tool:
    """One function a model may call: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def openai(self) -> dict[str, Any]:
        """OpenAI's form, ``{"type": "function", "function": {...}}``: what chat templates are given."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI's ``tools`` list as :class:`Tool` s; ``ToolError`` naming the entry that is not a function tool."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    out: list[Tool] = []
    for i, entry in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(entry, Mapping) or entry.get("type", "function") != "function":
            raise ToolError(f"{where}: only function tools are supported ({{\"type\": \"function\", ...}})")
        function = entry.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}.function must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if any(t.name == name for t in out):
            raise ToolError(f"{where}.function.name {name!r} is used twice")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string")
        out.append(Tool(name, description, dict(parameters)))
    return out


@dataclass(frozen=True)
class ToolChoice:
    """``mode``: "none", "auto", "required" or "function" (then ``name`` is the function to call)."""

    mode: str = "auto"
    name: str | None = None


def parse_tool_choice(choice: Any, tools: Sequence[Tool]) -> ToolChoice:
    """OpenAI's ``tool_choice`` ("none", "auto", "required", ``{"type": "function", "function": {"name"}}``)."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice {choice!r} is not one of none, auto, required or a named function")
        if choice != "none" and not tools:
            raise ToolError(f"tool_choice {choice!r} needs tools")
        return ToolChoice(choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    if not isinstance(name, str):
        raise ToolError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}')
    if not any(t.name == name for t in tools):
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
    return ToolChoice("function", name)


def call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """JSON schema of one call to any of ``tools``: its name, and arguments valid for that function."""
    options = [
        {"type": "object", "properties": {"name": {"const": t.name}, "parameters": _closed(t.parameters)},
         "required": ["name", "parameters"], "additionalProperties": False}
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _closed(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A function's arguments are the ones it declares: unless its schema says otherwise, no others (as
    OpenAI's strict mode and llama.cpp's grammars treat them; a function rarely accepts unknown arguments)."""
    schema = dict(parameters)
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def tool_grammar(tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool = True) -> Grammar | None:
    """The grammar the answer follows for ``choice`` (None for "none": the answer is free)."""
    if choice.mode == "none" or not tools:
        return None
    allowed = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    call = f"%json {json.dumps({**call_schema(allowed), 'x-guidance': JSON_STYLE})}"
    calls = 'call ("; " call)*' if parallel else "call"
    if choice.mode == "auto":
        # An ordinary answer is anything that does not begin like a call.
        lark = f"start: calls | prose\ncalls: {calls}\ncall: {call}\nprose: /[^{{\\s][\\s\\S]*/"
    else:
        lark = f"start: {calls}\ncall: {call}"
    return Grammar.lark(lark, kind="tool_call")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: an id for the tool's answer to refer to, the function, and its arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self) -> dict[str, Any]:
        """OpenAI's form, with the arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def read_tool_calls(text: str, tools: Sequence[Tool]) -> list[ToolCall] | None:
    """The calls ``text`` makes (``<|python_tag|>`` and surrounding space allowed), or None if it is not wholly
    calls to ``tools`` (then it is an ordinary answer). A last call cut short after whole ones is dropped."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].lstrip()
    if not body.startswith("{"):
        return None
    names = {t.name for t in tools}
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while pos < len(body):
        try:
            value, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            # A further call cut off by max_tokens after whole ones: the whole ones were made.
            return calls if calls and body[pos:].startswith("{") else None
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if not isinstance(value, dict) or value.get("name") not in names or not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(value["name"], arguments))
        rest = body[pos:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        pos = len(body) - len(rest)
    return calls or None


def call_text(call: Mapping[str, Any]) -> str:
    """A dialog's tool call ({"function": {"name", "arguments"}}) as the model writes it."""
    function = call["function"]
    return json.dumps({"name": function["name"], "parameters": function["arguments"]}, ensure_ascii=False)


def plain_tool_dialog(dialog: Sequence[Mapping[str, Any]], tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """``dialog`` for a chat template that knows nothing of tools: the tools and how to call them described in
    the system message, assistant calls written out as the model writes them, tool results as user turns."""
    out: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    for message in dialog:
        role, content = message["role"], message.get("content")
        if message.get("tool_calls"):
            for call in message["tool_calls"]:
                if call.get("id"):
                    names_by_id[call["id"]] = call["function"]["name"]
            text = "; ".join(call_text(c) for c in message["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + text})
        elif role in ("tool", "ipython"):
            name = names_by_id.get(message.get("tool_call_id") or "", message.get("name") or "the tool")
            out.append({"role": "user", "content": f"Result of {name}: {content}"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        described = "\n".join(json.dumps(t.openai()["function"], ensure_ascii=False) for t in tools)
        instructions = (
            "You can call these functions:\n" + described + "\n\nTo call one, answer with only a JSON object "
            '{"name": function name, "parameters": {argument name: value}}. '
            "When a function's result is given, use it to answer the user."
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + instructions}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out
