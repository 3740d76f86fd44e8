"""Chat prompts through the checkpoint's chat template (token ids of earlier turns reused, not re-tokenized) and
tool calls in the Hermes / Qwen `<tool_call>{"name": ..., "arguments": ...}</tool_call>` format."""

from __future__ import annotations

import json
import re
from typing import Optional

from rollout.serve.errors import APIError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def render(tokenizer, messages: list[dict], tools: Optional[list[dict]], template_kwargs: dict,
           prefix_token_ids: Optional[list[int]]) -> list[int]:
    """The prompt's token ids: the conversation rendered by the chat template, with a generation prompt.

    With `prefix_token_ids` (an earlier response's prompt_token_ids + token_ids) those ids are kept as they are
    and only the text the template renders after them is tokenized; their decoded text must begin the rendered
    conversation (400 otherwise).
    """
    if tokenizer is None:
        raise APIError(400, "the checkpoint has no tokenizer, so no chat template; use /v1/completions or "
                            "/generate with token ids", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "the checkpoint's tokenizer has no chat template (chat_template in "
                            "tokenizer_config.json); use /v1/completions or /generate", "messages")
    try:
        text = tokenizer.apply_chat_template(_template_messages(messages), tools=tools, tokenize=False,
                                             add_generation_prompt=True, **template_kwargs)
    except Exception as exc:  # jinja2 errors: the template rejected these messages
        raise APIError(400, f"the chat template cannot render these messages: {type(exc).__name__}: {exc}",
                       "messages") from None
    if prefix_token_ids is None:
        return tokenizer.encode(text, add_special_tokens=False)
    prefix = tokenizer.decode(prefix_token_ids, skip_special_tokens=False)
    if not text.startswith(prefix):
        raise APIError(400, "prefix_token_ids do not decode to the start of the rendered conversation; pass an "
                            "earlier response's prompt_token_ids + token_ids, and as that turn's assistant content "
                            "its token ids decoded with special tokens, less the end-of-turn token the template "
                            "adds", "prefix_token_ids")
    return list(prefix_token_ids) + tokenizer.encode(text[len(prefix):], add_special_tokens=False)


def _template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates expect them: text parts joined, tool-call arguments as objects."""
    out = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), list):
            message["content"] = "".join(part["text"] for part in message["content"])
        if message.get("tool_calls"):
            message["tool_calls"] = [_call_for_template(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _call_for_template(call: dict) -> dict:
    function = dict(call["function"])
    try:
        function["arguments"] = json.loads(function["arguments"])
    except (TypeError, ValueError):
        pass  # not JSON text: the template gets it as it came
    return {**call, "function": function}


def parse_tool_calls(text: str, call_id_prefix: str) -> tuple[Optional[str], list[dict]]:
    """(content, tool calls) of a completion: each `<tool_call>` block holding a JSON object with "name" becomes
    an OpenAI tool call (arguments as JSON text); with any block that is not such JSON, no calls are parsed."""
    blocks = TOOL_CALL.findall(text)
    calls = []
    for i, block in enumerate(blocks):
        try:
            item = json.loads(block)
        except ValueError:
            return text, []
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return text, []
        arguments = item.get("arguments", {})
        calls.append({"id": f"{call_id_prefix}-{i}", "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    if not calls:
        return text, []
    content = TOOL_CALL.sub("", text).strip()
    return content or None, calls
