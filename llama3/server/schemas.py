"""Request bodies of the OpenAI API, validated by pydantic (and published in /openapi.json).

Ranges follow OpenAI and vLLM: temperature in [0, 2], top_p in (0, 1], penalties in [-2, 2], logit_bias values
in [-100, 100], max_tokens >= 1. Unknown fields are ignored, as OpenAI-compatible servers do, so clients that
send newer parameters keep working. ``top_k``, ``min_p`` and ``repetition_penalty`` are accepted as extensions
(vLLM's names).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
# Non-empty text, stated in the schema but checked by the server (protocol.completion_prompts): pydantic's own
# length check copies the text into Rust, which refuses the lone surrogates the server reads as U+FFFD.
Text = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ContentPart(BaseModel):
    """A part of a message's content; only text parts can be served by a text model."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = Field(description="the arguments as a JSON object, in a string (OpenAI's form)")


class ToolCallIn(BaseModel):
    """A tool call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="who speaks (developer is read as system)")
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="on assistant messages: the calls it made")
    tool_call_id: str | None = Field(None, description="on tool messages: the call this result answers")


class SamplingFields(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="the served model, or a LoRA adapter's name (llama3 serve --lora "
                              "NAME=DIR) to answer with it; without adapters any value means the one model")
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = Field(
        None, description="0 is greedy (default 1)"
    )
    top_p: Probability | None = Field(None, description="nucleus mass (default 1)")
    n: Annotated[int, Field(ge=1, le=128)] | None = Field(None, description="choices per prompt (default 1)")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="default: what the context leaves")
    stop: str | list[str] | None = Field(None, description="stop strings, added to the model's own stop tokens")
    seed: Seed | None = Field(None, description="same seed and request give the same output")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit"
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(None, description="extension: keep the k likeliest tokens")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}')
    guided_json: dict[str, Any] | str | None = Field(None, description="extension (vLLM): a JSON schema to follow")
    guided_regex: str | None = Field(None, description="extension (vLLM): a regular expression the whole output matches")
    guided_choice: list[str] | None = Field(None, description="extension (vLLM): the output is one of these strings")
    guided_grammar: str | None = Field(None, description="extension (vLLM): a grammar, GBNF or Lark")
    grammar: str | None = Field(None, description="extension (llama.cpp): a GBNF grammar")
    json_schema: dict[str, Any] | None = Field(None, description="extension (llama.cpp): a JSON schema to follow")
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = Field(None, description='function tools: {"type": "function", "function": {...}}')
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto" (default with tools), "required", or {"type": "function", "function": {"name"}}')
    parallel_tool_calls: bool | None = Field(None, description="allow several calls in one answer (default true)")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="newer name of max_tokens")
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)] = Field(
        description="text, texts, token ids, or token id lists")
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(None, description="number of top alternatives")
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama3"
    parent: str | None = Field(None, description="for a LoRA adapter: the base model it runs on (as vLLM reports)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
