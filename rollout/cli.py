"""The `rollout` command line: `rollout demo`, `rollout generate` and `rollout serve`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

from pydantic import ValidationError

from rollout.errors import InvalidRequestError
from rollout.sampling_params import SamplingParams
from worker.config import DTYPES
from worker.errors import CheckpointError, UnsupportedArchitectureError


class UsageError(ValueError):
    """A file named on the command line that cannot be read or written as asked."""


USER_ERRORS = (
    ValidationError, InvalidRequestError, CheckpointError, UnsupportedArchitectureError, UsageError,
    FileNotFoundError, FileExistsError,
)
LINE_KEYS = {"prompt", "prompt_token_ids", "sampling_params"}
# generate's flags (argparse dests) that set a SamplingParams default, named like its fields
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "n", "logprobs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `rollout` command; returns the exit status (0 ok, 2 bad input or checkpoint)."""
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"rollout {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollout", description="Rollout (sampling) engine for RL post-training.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="sample from a small random Qwen3 checkpoint (built locally, cached)")
    demo.add_argument("--model", help="checkpoint directory (default: the cached demo checkpoint)")
    demo.add_argument("--device", type=_device, default="cpu", help="cpu, auto, cuda or cuda:N (default: cpu)")
    demo.add_argument("--prompts", type=_positive, default=8, help="number of prompts (default: 8)")
    demo.add_argument("--n", type=_positive, default=4, help="samples per prompt (default: 4)")
    demo.add_argument("--max-tokens", type=_positive, default=64, help="most new tokens per sample (default: 64)")
    demo.set_defaults(func=_demo)

    gen = commands.add_parser("generate", help="sample completions for the prompts of a JSONL file")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    gen.add_argument("--prompts", required=True, type=Path,
                     help='JSONL file; each line {"prompt": str} or {"prompt_token_ids": [int]}, '
                          'optionally with "sampling_params": {...} overriding the sampling defaults')
    gen.add_argument("--output", type=Path, help="JSONL file for the outputs (default: stdout)")
    gen.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    gen.add_argument("--dtype", default="auto", choices=DTYPES)
    gen.add_argument("--seed", type=int, default=0,
                     help="engine seed: lines without their own sampling_params.seed draw theirs from it (default: 0)")
    sampling = gen.add_argument_group(
        "sampling defaults", "SamplingParams fields; a line's sampling_params override them"
    )
    sampling.add_argument("--max-tokens", type=int, help="most new tokens per sample")
    sampling.add_argument("--temperature", type=float, help="0 is greedy")
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--n", type=int, help="samples per prompt")
    sampling.add_argument("--logprobs", action="store_true", default=None, help="return each sampled token's logprob")
    gen.set_defaults(func=_generate)
    _serve_parser(commands)
    return parser


def _serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI routes, /generate, control "
                                              "routes); needs the 'serve' extra")
    serve.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", help="every route then needs 'Authorization: Bearer KEY'")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="allow a non-loopback --host without --api-key")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the directory's name)")
    serve.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    serve.add_argument("--dtype", default="auto", choices=DTYPES)
    serve.add_argument("--seed", type=int, default=0, help="engine seed for requests without one (default: 0)")
    serve.add_argument("--executor", choices=("local", "ray"), default="local")
    serve.add_argument("--data-parallel-size", type=_positive, default=1, help="replicas (--executor ray)")
    serve.add_argument("--max-num-seqs", type=_positive, help="most samples running at once")
    serve.add_argument("--max-model-len", type=_positive, help="longest prompt + completion")
    serve.add_argument("--enable-sleep-mode", action="store_true", help="allow /sleep and /wake_up")
    serve.add_argument("--engine-args", type=json.loads, default={},
                       help='more EngineConfig fields as a JSON object, e.g. \'{"num_kv_blocks": 512}\'')
    serve.add_argument("--max-body-bytes", type=_positive, default=32 * 2**20, help="request body limit")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from rollout.serve.server import is_loopback, run_serve

    if args.api_key is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise UsageError(f"refusing to serve on {args.host} (not a loopback address) without --api-key; give a "
                         f"key, or --allow-unauthenticated to serve anyone who can reach the port")
    if args.api_key == "":
        raise UsageError("--api-key must not be empty")
    model = _checkpoint_dir(args.model)
    config = dict(args.engine_args, model=str(model), device=args.device, dtype=args.dtype, seed=args.seed,
                  executor=args.executor, data_parallel_size=args.data_parallel_size,
                  enable_sleep_mode=args.enable_sleep_mode)
    config.update({k: getattr(args, k) for k in ("max_num_seqs", "max_model_len") if getattr(args, k) is not None})
    run_serve(config, host=args.host, port=args.port, model_name=args.served_model_name or model.resolve().name,
              api_key=args.api_key, allow_unauthenticated=args.allow_unauthenticated,
              max_body_bytes=args.max_body_bytes, log_level=args.log_level)


def _device(value: str) -> str:
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: torch sees no CUDA device here")
    return value


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _demo(args: argparse.Namespace) -> None:
    from rollout.demo import run_demo

    model = _checkpoint_dir(args.model) if args.model else None
    run_demo(model, num_prompts=args.prompts, n=args.n, max_tokens=args.max_tokens, device=args.device)


def _generate(args: argparse.Namespace) -> None:
    from rollout.engine import RolloutEngine
    from rollout.validation import check_requests

    if args.output is not None:
        _check_output_path(args.output, args.prompts)
    defaults = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    SamplingParams(**defaults)  # a bad flag is reported once, not as an error of the first line
    requests = read_requests(args.prompts, defaults)
    engine = RolloutEngine(model=str(_checkpoint_dir(args.model)), device=args.device, dtype=args.dtype, seed=args.seed)
    labels = [f"{args.prompts} line {line_no}" for line_no, _, _ in requests]
    prompts, params = check_requests([prompt for _, prompt, _ in requests], [p for _, _, p in requests],
                                     engine.tokenizer, engine.vocab_size, engine.max_model_len, labels)
    outputs = engine.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    if args.output is None:
        _write(outputs, sys.stdout)
        return
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            _write(outputs, f)
    except OSError as exc:
        raise UsageError(f"cannot write --output {args.output}: {exc.strerror}") from None


def _check_output_path(path: Path, prompts: Path) -> None:
    """UsageError unless `path` can be written as a file: not a directory nor the prompts, in a writable directory."""
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory; give a file name")
    if path.exists() and path.resolve() == prompts.resolve():
        raise UsageError(f"--output {path} is the --prompts file; writing would overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"--output {path}: the directory {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UsageError(f"--output {path} is not writable")


def read_requests(path: Path, defaults: dict) -> list[tuple[int, object, SamplingParams]]:
    """(line number, prompt, SamplingParams) per non-blank JSONL line; InvalidRequestError names a bad line.

    `defaults` are SamplingParams fields; a line's "sampling_params" override them.
    """
    requests = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            try:
                requests.append((line_no, *_parse_line(line, defaults)))
            except ValueError as exc:
                raise InvalidRequestError(f"{path} line {line_no}: {_one_line(exc)}") from None
    if not requests:
        raise InvalidRequestError(f"{path} holds no prompts")
    return requests


def _read_lines(path: Path) -> list[str]:
    """The file's lines as text; UsageError if it cannot be read, InvalidRequestError naming a line not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --prompts {path}: {exc.strerror}") from None
    lines = []
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"{path} line {line_no}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                                      f"position {exc.start + 1})") from None
    return lines


def _parse_line(line: str, defaults: dict) -> tuple[object, SamplingParams]:
    try:
        item = json.loads(line.strip())
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at character {exc.pos + 1}") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - LINE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed: {sorted(LINE_KEYS)}")
    if ("prompt" in item) == ("prompt_token_ids" in item):
        raise ValueError('give exactly one of "prompt" (a string) or "prompt_token_ids" (a list of ints)')
    if "prompt" in item and not isinstance(item["prompt"], str):
        raise ValueError(f'"prompt" must be a string, got {type(item["prompt"]).__name__}')
    if "prompt_token_ids" in item and not isinstance(item["prompt_token_ids"], list):
        kind = type(item["prompt_token_ids"]).__name__
        raise ValueError(f'"prompt_token_ids" must be a list of ints, got {kind}')
    overrides = item.get("sampling_params", {})
    if not isinstance(overrides, dict):
        raise ValueError(f'"sampling_params" must be an object, got {type(overrides).__name__}')
    prompt = item["prompt"] if "prompt" in item else item["prompt_token_ids"]
    return prompt, SamplingParams(**{**defaults, **overrides})


def _checkpoint_dir(model: str) -> Path:
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a checkpoint directory (no config.json there)")
    return path


def _write(outputs, stream: TextIO) -> None:
    """One line of strict JSON per output: a logprob of -inf (a token the filters ruled out, listed in
    top_logprobs) is written as null; a NaN, which JSON cannot hold either, raises ValueError."""
    for output in outputs:
        stream.write(json.dumps(_null_for_minus_inf(output.model_dump()), allow_nan=False) + "\n")
    stream.flush()


def _null_for_minus_inf(value):
    if isinstance(value, dict):
        return {key: _null_for_minus_inf(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_null_for_minus_inf(v) for v in value]
    return None if value == float("-inf") else value


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
                         for e in exc.errors())
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
