"""Checking requests before any work starts, and reading what the checkpoint says about tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rollout.errors import InvalidRequestError
from rollout.sampling_params import SamplingParams, is_integer

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


def check_requests(prompts, sampling_params, tokenizer, vocab_size: int, max_model_len: int,
                   labels: Optional[list[str]] = None):
    """Token-id prompts and one SamplingParams per prompt, or InvalidRequestError naming what is wrong.

    Errors name a prompt by its label: "prompt 3" unless `labels` (one per prompt) says otherwise.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError("prompts must be a list of prompts (each a list of token ids or a string)")
    if prompts and all(is_integer(p) for p in prompts):
        raise InvalidRequestError("prompts must be a list of prompts; wrap a single token-id prompt as [[...]]")
    labels = labels or [f"prompt {i}" for i in range(len(prompts))]
    params = _per_prompt(sampling_params, len(prompts))
    token_prompts = [_tokens(label, p, tokenizer, vocab_size, max_model_len) for label, p in zip(labels, prompts)]
    for label, p in zip(labels, params):
        _check_params(label, p, tokenizer, vocab_size)
    return token_prompts, params


def _per_prompt(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if not isinstance(sampling_params, (list, tuple)):
        raise InvalidRequestError(f"sampling_params must be a SamplingParams, a list of one per prompt, or None; "
                                  f"got {type(sampling_params).__name__}")
    if len(sampling_params) != count:
        raise InvalidRequestError(f"got {len(sampling_params)} SamplingParams for {count} prompts; give one, or one "
                                  f"per prompt")
    for i, p in enumerate(sampling_params):
        if not isinstance(p, SamplingParams):
            raise InvalidRequestError(f"sampling_params[{i}] is a {type(p).__name__}, not a SamplingParams")
    return list(sampling_params)


def _tokens(label: str, prompt, tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError(f"{label}: a string, but the checkpoint has no tokenizer; pass token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = _token_ids(label, prompt, vocab_size)
    else:
        raise InvalidRequestError(f"{label}: a {type(prompt).__name__}; expected a list of token ids or a string")
    if not ids:
        raise InvalidRequestError(f"{label}: no tokens; a prompt needs at least one")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"{label}: {len(ids)} tokens; with max_model_len={max_model_len} a prompt may have at most "
            f"{max_model_len - 1} (room for one new token)"
        )
    return ids


def _token_ids(label: str, prompt, vocab_size: int) -> list[int]:
    """The ids as ints: ints or numpy integers in [0, vocab_size); bools and floats are refused."""
    if prompt and set(map(type, prompt)) == {int} and 0 <= min(prompt) and max(prompt) < vocab_size:
        return list(prompt)  # the common case, checked at C speed
    for pos, t in enumerate(prompt):
        if not is_integer(t):
            raise InvalidRequestError(f"{label}: token ids must be ints; got {type(t).__name__} {t!r} "
                                      f"at position {pos}")
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"{label}: token ids must be in [0, {vocab_size}); got {bad[:5]}")
    return ids


def _check_params(label: str, p: SamplingParams, tokenizer: Optional[object], vocab_size: int) -> None:
    if p.stop and tokenizer is None:
        raise InvalidRequestError(f"{label}: stop strings need a tokenizer, and the checkpoint has none")
    bad = [t for t in p.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"{label}: stop_token_ids must be in [0, {vocab_size}); got {bad}")
    if p.prompt_logprobs is not None and p.prompt_logprobs > vocab_size:
        raise InvalidRequestError(f"{label}: prompt_logprobs={p.prompt_logprobs} exceeds the vocabulary size "
                                  f"{vocab_size}")
    if p.top_logprobs > vocab_size:
        raise InvalidRequestError(f"{label}: top_logprobs={p.top_logprobs} exceeds the vocabulary size {vocab_size}")
