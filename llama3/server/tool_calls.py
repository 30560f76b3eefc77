"""Tool calling on /v1/chat/completions: the request's tools and tool choice, and answers read back as calls.

A choice whose text is wholly calls to the request's tools (see ``llama3.tools``) is answered as OpenAI does:
``message.tool_calls`` with JSON-string arguments, ``content`` null and ``finish_reason`` "tool_calls". While
streaming, text that could still become a call (it begins with ``{``) is held back; at the end it goes out as
one ``tool_calls`` delta per call (``index``, ``id``, ``type``, ``function.name`` and the whole ``arguments``),
or as ordinary content if it turned out not to be a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..constraints.grammar import Grammar
from ..tools import Tool, ToolChoice, ToolError, parse_tool_choice, parse_tools, read_tool_calls, tool_grammar
from .errors import APIError
from .schemas import ChatCompletionRequest


@dataclass
class ChatTools:
    """The tools of one chat request, validated (400s name the field)."""

    tools: list[Tool]
    choice: ToolChoice
    grammar: Grammar | None

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> ChatTools:
        try:
            tools = parse_tools(req.tools) if req.tools is not None else []
        except ToolError as exc:
            raise APIError(400, str(exc), param="tools") from None
        try:
            choice = parse_tool_choice(req.tool_choice, tools)
        except ToolError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        parallel = req.parallel_tool_calls is not False
        return cls(tools, choice, tool_grammar(tools, choice, parallel=parallel))

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice.mode != "none"

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` if ``text`` is wholly calls, else None."""
        found = read_tool_calls(text, self.tools) if self.active else None
        return [call.openai() for call in found] if found else None

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The response message and finish reason of a finished choice."""
        calls = self.calls(text)
        if calls is None:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"

    def stream(self) -> CallStream:
        return CallStream(self)


class CallStream:
    """One streamed choice: passes text through, except text that may be a call, which waits for the end."""

    def __init__(self, tools: ChatTools) -> None:
        self.tools = tools
        self.held = ""
        self.deciding = tools.active

    def feed(self, text: str) -> str:
        """The part of ``text`` to send now as content."""
        if not self.deciding:
            return text
        self.held += text
        start = self.held.lstrip()
        if not start or start.startswith("{"):
            return ""
        self.deciding = False
        out, self.held = self.held, ""
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """At the end: held text to send as content, or the calls (each with its ``index``) it made."""
        held, self.held = self.held, ""
        calls = self.tools.calls(held) if held else None
        if calls is None:
            return held, None
        return "", [{"index": i, **call} for i, call in enumerate(calls)]
