"""Tool calling on ``/v1/chat/completions``: ``tools`` + ``tool_choice``, as vLLM serves them.

- ``"none"`` (or no tools): plain generation.
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is
  constrained to JSON valid against that function's ``parameters`` schema, and returned as one
  tool call to it (streamed as argument deltas).
- ``"required"``: the output is constrained to a JSON array of ``{"name", "parameters"}``
  objects, each valid against its function (one item when ``parallel_tool_calls`` is false),
  and returned as tool calls.
- ``"auto"``: only where the model's chat template renders tools; the model's output is parsed
  for Hermes-style ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks (the format
  of the templates that render tools, e.g. Qwen and Hermes models). Elsewhere a 400 says so.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from prolora_serve.server.engine.grammar import GrammarSpec

from .errors import APIError
from .schemas import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall, ToolDefinition

ToolMode = Literal["none", "named", "required", "auto"]
_HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: ToolMode
    tools: tuple[ToolDefinition, ...] = ()
    grammar: GrammarSpec | None = None
    named: str | None = None  # the function of a named tool choice

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """What the chat template gets as ``tools`` (only "auto" lets the model choose)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.mode == "auto" else None

    @property
    def constrained(self) -> bool:
        return self.mode in ("named", "required")


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def plan_tools(body: ChatCompletionRequest, renders_tools: bool) -> ToolPlan:
    tools = tuple(body.tools or ())
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none" or not tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise APIError(400, f"tool_choice {_describe(choice)} needs tools", param="tool_choice")
        return ToolPlan("none")
    by_name = {tool.function.name: tool for tool in tools}
    if len(by_name) != len(tools):
        raise APIError(400, "tools have duplicate function names", param="tools")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in by_name:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")
        schema = by_name[name].function.parameters_schema
        return ToolPlan("named", tools, GrammarSpec.json_schema(schema, True, "tools"), name)
    if choice == "required":
        return ToolPlan("required", tools, GrammarSpec.json_schema(
            _calls_schema(tools, body.parallel_tool_calls is not False), True, "tools"))
    if not renders_tools:
        raise APIError(400, "tool_choice 'auto' needs a chat template that renders tools, and "
                       "this model's does not; use tool_choice 'required' or name a function",
                       param="tool_choice")
    return ToolPlan("auto", tools)


def _describe(choice: Any) -> str:
    return repr(choice.function.name) if isinstance(choice, NamedToolChoice) else repr(choice)


def _calls_schema(tools: tuple[ToolDefinition, ...], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for "required": a non-empty array of {name, parameters} objects."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                             "parameters": tool.function.parameters_schema},
              "required": ["name", "parameters"], "additionalProperties": False}
             for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_from_text(plan: ToolPlan, text: str) -> tuple[list[ToolCall], str | None]:
    """The tool calls in a finished output and the content left besides them."""
    if plan.mode == "named":
        json.loads(text)  # the grammar made it valid JSON; a truncated output raises
        return [ToolCall(id=new_call_id(), function=FunctionCall(name=plan.named, arguments=text))], None
    if plan.mode == "required":
        return [ToolCall(id=new_call_id(), function=FunctionCall(
            name=call["name"], arguments=json.dumps(call["parameters"])))
            for call in json.loads(text)], None
    if plan.mode == "auto":
        return _hermes_calls(plan, text)
    return [], text


def _hermes_calls(plan: ToolPlan, text: str) -> tuple[list[ToolCall], str | None]:
    names = {tool.function.name for tool in plan.tools}
    calls = []
    for block in _HERMES_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            continue  # not a call: it stays in the content
        if isinstance(call, dict) and call.get("name") in names:
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append(ToolCall(id=new_call_id(), function=FunctionCall(
                name=call["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))))
    if not calls:
        return [], text
    rest = _HERMES_CALL.sub("", text).strip()
    return calls, rest or None
