"""Request bodies of the HTTP routes (pydantic; unknown fields are refused, naming the field)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from rollout.outputs import PartialSample
from rollout.pause import PauseMode
from rollout.sampling_params import Float, Int, SamplingParams

MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields the OpenAI routes share (OpenAI's plus vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    n: Int = 1
    max_tokens: Optional[Int] = Field(None, description="Most new tokens per completion (default 16).")
    temperature: Optional[Float] = None
    top_p: Optional[Float] = None
    top_k: Optional[Int] = None
    min_p: Optional[Float] = None
    min_tokens: Int = 0
    seed: Optional[Int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[Int]] = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: bool = Field(False, description="Put prompt_token_ids and token_ids on each choice.")
    request_id: Optional[str] = Field(None, description="Id for /abort_request (default: a fresh one).")
    user: Optional[str] = None
    presence_penalty: Optional[Float] = None
    frequency_penalty: Optional[Float] = None
    repetition_penalty: Optional[Float] = None
    best_of: Optional[Int] = None
    logit_bias: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of is not supported; leave it out or equal to n ({self.n})")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it out")
        return self

    def sampling_params(self, logprobs: Optional[int], prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """The engine's SamplingParams; `logprobs` (None: none) most likely tokens besides the sampled one,
        `prompt_logprobs` (None: no prompt scoring) at each prompt token."""
        fields = dict(n=self.n, max_tokens=16 if self.max_tokens is None else self.max_tokens,
                      min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, seed=self.seed,
                      stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
                      logprobs=logprobs is not None, top_logprobs=logprobs or 0, prompt_logprobs=prompt_logprobs)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return SamplingParams(**fields)


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: prompt as text, token ids, or a list of either."""

    prompt: Any
    logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="Put the prompt before each choice's text; with logprobs, the prompt "
                                          "tokens' logprobs (the first None) before the completion's. "
                                          "max_tokens=0 then scores the prompt without generating.")
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        return prompts_of(value)

    @model_validator(mode="after")
    def _unsupported_here(self):
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream=true; send it without stream")
        if self.suffix:
            raise ValueError("suffix is not supported; leave it out")
        return self

    def completion_params(self) -> SamplingParams:
        """The engine's SamplingParams; with echo and logprobs (or max_tokens=0) the prompt is scored too."""
        score = self.echo and (self.logprobs is not None or self.max_tokens == 0)
        return self.sampling_params(self.logprobs, (self.logprobs or 0) if score else None)


def prompts_of(value) -> list:
    """The prompts of a completions request: each a string or a non-empty list of token ids."""
    kinds = "a string, a list of token ids, or a non-empty list of either"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be {kinds}")
    if all(_is_int(x) for x in value):
        return [value]
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and all(_is_int(x) for x in item):
            prompts.append(item)
        else:
            raise ValueError(f"item {i} must be a string or a non-empty list of token ids (ints); prompt must be "
                             f"{kinds}")
    return prompts


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class GenerateRequest(BaseModel):
    """`POST /generate`: token in, token out."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[StrictInt] = Field(min_length=1)  # checked in pydantic's core: the hot path
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    rid: Optional[str] = None
    stream: bool = False
    partial: Optional[PartialSample] = Field(None, description="An earlier sample to continue.")


class AbortRequest(BaseModel):
    """`POST /abort_request`: one request (`rid`, with the sub-requests of a multi-prompt completion) or all."""

    model_config = ConfigDict(extra="forbid")
    rid: Optional[str] = None
    abort_all: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.rid is None) == (not self.abort_all):
            raise ValueError("give either rid (a request id) or abort_all=true")
        return self


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: PauseMode = "keep"


class SleepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: Literal[1, 2] = 1


class WakeUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: Optional[list[Literal["weights", "kv_cache"]]] = None


class InitWeightTransferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_info: dict[str, Any]
    worker_index: Optional[Int] = None


class UpdateWeightsRequest(BaseModel):
    """`POST /update_weights`: the trainer's next update over the transfer group (`update_info`), or, with `path`,
    the safetensors of a checkpoint directory on this machine."""

    model_config = ConfigDict(extra="forbid")
    update_info: Optional[dict[str, Any]] = None
    path: Optional[str] = None
    version: Optional[Int] = Field(None, description="With path: the new weight version (default: current + 1).")
    pause_mode: PauseMode = "wait"

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is not None and self.update_info is not None:
            raise ValueError("give update_info (a transfer-group update) or path (a checkpoint directory), not both")
        if self.path is None and self.version is not None:
            raise ValueError("version goes with path; a transfer-group update carries it in update_info")
        return self


class LoadWeightsRequest(BaseModel):
    """`POST /load_weights_from_disk`: the safetensors of a checkpoint directory on this machine."""

    model_config = ConfigDict(extra="forbid")
    path: str
    version: Optional[Int] = None
    pause_mode: PauseMode = "wait"


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`: OpenAI's fields, plus `prefix_token_ids` (the earlier turns' ids, kept as they
    are) and `chat_template_kwargs` (e.g. {"enable_thinking": false})."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Literal["auto", "none"]] = None
    logprobs: bool = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: Optional[Int] = None
    prefix_token_ids: Optional[list[Int]] = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    parallel_tool_calls: Optional[bool] = None

    @model_validator(mode="after")
    def _max(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_completion_tokens or max_tokens, not two different values")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self
