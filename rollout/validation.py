"""Checking requests before any work starts, and reading what the checkpoint says about tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rollout.errors import InvalidRequestError
from rollout.sampling_params import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or None when it ships none; CheckpointError naming its files if they are broken."""
    present = [name for name in TOKENIZER_FILES if (model_dir / name).exists()]
    if not present:
        return None
    from transformers import AutoTokenizer

    from worker.errors import CheckpointError
    from worker.loader import read_json

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers and tokenizers raise many types (JSONDecodeError, KeyError, Exception)
        for name in present:
            if name.endswith(".json"):
                read_json(model_dir / name)  # a file that is not JSON is named alone
        raise CheckpointError(f"the tokenizer of {model_dir} ({', '.join(present)}) cannot be loaded: "
                              f"{type(exc).__name__}: {exc}") from exc


def load_eos_token_ids(model_dir: Path, hf_config) -> set[int]:
    """End-of-sequence ids from generation_config.json, else from config.json; CheckpointError naming the file
    unless every eos_token_id in either is a token id below the config's vocab_size."""
    from worker.errors import CheckpointError
    from worker.loader import read_json

    found = []  # (file, eos_token_id), the one that counts first
    generation = model_dir / "generation_config.json"
    if generation.exists():
        raw = read_json(generation)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{generation} must be a JSON object")
        found.append((generation, raw.get("eos_token_id")))
    found.append((model_dir / "config.json", getattr(hf_config, "eos_token_id", None)))
    vocab_size = hf_config.vocab_size
    sets = []
    for source, eos in found:
        ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        bad = [e for e in ids if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab_size]
        if bad:
            raise CheckpointError(f"{source}: eos_token_id {eos!r} must be a token id in [0, {vocab_size}) or a "
                                  f"list of them; not {bad}")
        if eos is not None:
            sets.append(set(ids))
    return sets[0] if sets else set()


def check_requests(prompts, sampling_params, tokenizer, vocab_size: int, max_model_len: int):
    """Token-id prompts and one SamplingParams per prompt, or InvalidRequestError naming what is wrong."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError("prompts must be a list of prompts (each a list of token ids or a string)")
    if prompts and all(isinstance(p, int) for p in prompts):
        raise InvalidRequestError("prompts must be a list of prompts; wrap a single token-id prompt as [[...]]")
    params = _per_prompt(sampling_params, len(prompts))
    token_prompts = [_tokens(i, p, tokenizer, vocab_size, max_model_len) for i, p in enumerate(prompts)]
    for i, p in enumerate(params):
        _check_params(i, p, tokenizer, vocab_size)
    return token_prompts, params


def _per_prompt(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts; give one, or one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise InvalidRequestError(f"sampling_params[{i}] is a {type(p).__name__}, not a SamplingParams")
    return params


def _tokens(i: int, prompt, tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError(f"prompt {i} is a string, but the checkpoint has no tokenizer; pass token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
    else:
        raise InvalidRequestError(f"prompt {i} is a {type(prompt).__name__}; expected a list of token ids or a string")
    if not ids:
        raise InvalidRequestError(f"prompt {i} is empty; a prompt needs at least one token")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"prompt {i} has {len(ids)} tokens; with max_model_len={max_model_len} a prompt may have at most "
            f"{max_model_len - 1} (room for one new token)"
        )
    return ids


def _check_params(i: int, p: SamplingParams, tokenizer: Optional[object], vocab_size: int) -> None:
    if p.stop and tokenizer is None:
        raise InvalidRequestError(f"sampling_params for prompt {i} has stop strings, but the checkpoint has no tokenizer")
    bad = [t for t in p.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"sampling_params for prompt {i}: stop_token_ids outside [0, {vocab_size}): {bad}")
    if p.top_logprobs > vocab_size:
        raise InvalidRequestError(f"top_logprobs={p.top_logprobs} exceeds the vocabulary size {vocab_size}")
