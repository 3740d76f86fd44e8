"""Reading Hugging Face checkpoints (config.json, safetensors files, the shard index) and checking weights.

A file that cannot be read or used is a CheckpointError naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from worker.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Sizes the model is built from: each must be a positive int wherever the config sets it.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
# safetensors header dtypes torch can load (only the floating ones are accepted as weights).
HEADER_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64, "BOOL": torch.bool,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
}


def read_json(path: Path) -> object:
    """The parsed JSON file, or CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or bad JSON
        raise CheckpointError(f"{path} is not a readable JSON file: {exc}") from exc


def load_config(root: Path) -> PretrainedConfig:
    """The transformers config of a checkpoint directory, with the sizes the model is built from checked."""
    from transformers import CONFIG_MAPPING, AutoConfig

    path = root / CONFIG_FILE
    if not path.is_file():
        what = "does not exist" if not root.exists() else f"has no {CONFIG_FILE}"
        raise CheckpointError(f"model {str(root)!r} {what}; expected a Hugging Face checkpoint directory")
    raw = read_json(path)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        raise CheckpointError(f'{path} must be a JSON object with a "model_type" string such as "qwen3"')
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path}: model_type {model_type!r} is unknown to transformers")
    try:
        config = AutoConfig.from_pretrained(root)
    except Exception as exc:  # transformers raises ValueError, TypeError, KeyError or its own validation errors
        raise CheckpointError(f"{path}: transformers cannot use it: {exc}") from exc
    sizes = {name: getattr(config, name, None) for name in SIZE_FIELDS}
    bad = [f"{name}={value!r}" for name, value in sizes.items()
           if (value is not None or name == "vocab_size") and not _positive_int(value)]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)}; these sizes must be positive integers")
    return config


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Random weights in place (load_format='dummy'): normal with std 0.02, plus 1 for norm weights (the
    distribution of the benchmarks' random checkpoints), drawn in float32 on each parameter's device from a
    generator seeded with `seed`, 2**26 values at a time."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        gen = generators.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
        for part in param.data.view(-1).split(1 << 26):
            values = torch.randn(part.shape, generator=gen, device=part.device, dtype=torch.float32).mul_(0.02)
            part.copy_(values.add_(1.0) if name.endswith("norm.weight") else values)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.exists():
        return _shard_files(root, index)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in checkpoint directory {root}")
    return files


def _shard_files(root: Path, index: Path) -> list[Path]:
    """The shard files an index names: relative paths inside `root` that exist."""
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f'{index} needs a "weight_map" object mapping tensor names to shard file names')
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts]
    if outside:
        raise CheckpointError(f"{index} names shard files outside the checkpoint directory: {_head(outside)}; "
                              f"shards must be relative paths inside {root}")
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
    return [root / s for s in shards]


@contextlib.contextmanager
def _opened(file: Path):
    """safe_open, with a truncated or corrupt file reported as a CheckpointError naming it."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def checkpoint_headers(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the files, read from the headers only."""
    headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    seen: dict[str, Path] = {}
    for file in files:
        with _opened(file) as f:
            for name in f.keys():
                if name in seen:
                    raise CheckpointError(f"tensor {name} is stored twice: in {seen[name]} and in {file}")
                piece = f.get_slice(name)
                dtype = HEADER_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {piece.get_dtype()}; weights must be "
                                          f"floating point (F32, BF16, F16, ...)")
                headers[name], seen[name] = (tuple(piece.get_shape()), dtype), file
    return headers


def iter_checkpoint(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs from the files, one file open at a time."""
    for file in files:
        with _opened(file) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def named_tensors(weights: object, source: str) -> list[tuple[str, torch.Tensor]]:
    """`weights` ((name, tensor) pairs, or a mapping name -> tensor) as a list, or CheckpointError naming every bad
    entry. Touches no tensor data."""
    if isinstance(weights, Mapping):
        weights = weights.items()
    if isinstance(weights, (str, bytes, torch.Tensor)) or not isinstance(weights, Iterable):
        raise CheckpointError(f"{source} takes (name, tensor) pairs or a dict name -> tensor, got {_kind(weights)}")
    items = list(weights)
    if not items:
        raise CheckpointError(f"{source} got no tensors")
    problems = [problem for i, item in enumerate(items) if (problem := _entry_problem(i, item))]
    if problems:
        raise CheckpointError(f"{source}: {_head(problems)}; each entry must be a (str name, torch.Tensor) pair "
                              f"whose tensor holds data (dense, not on the meta device)")
    repeated = sorted(name for name, count in Counter(name for name, _ in items).items() if count > 1)
    if repeated:
        raise CheckpointError(f"{source} got the same tensor name more than once: {_head(repeated)}")
    return [(name, tensor) for name, tensor in items]


def _entry_problem(i: int, item: object) -> str:
    if not isinstance(item, (tuple, list)):
        return f"entry {i}: got {_kind(item)}, expected a (name, tensor) pair"
    if len(item) != 2:
        return f"entry {i}: got a {_kind(item)} of {len(item)} items, expected a (name, tensor) pair"
    name, tensor = item
    if not isinstance(name, str):
        return f"entry {i}: got a name of type {_kind(name)} ({name!r}), expected str"
    if not isinstance(tensor, torch.Tensor):
        return f"entry {i} ({name}): got {_kind(tensor)}, expected torch.Tensor"
    if tensor.is_meta or tensor.layout != torch.strided:
        return f"entry {i} ({name}): a {'meta' if tensor.is_meta else str(tensor.layout)} tensor has no dense data"
    return ""


def _kind(value: object) -> str:
    """A value's type as a reader would name it: None, int, numpy.ndarray."""
    if value is None:
        return "None"
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    given: dict[str, tuple[tuple[int, ...], torch.dtype]],
    full: bool,
    source: str,
    aliases: Optional[dict[str, tuple[tuple[int, ...], list[str]]]] = None,
) -> None:
    """Raise CheckpointError unless every given tensor is known, well-shaped and floating point.

    `given` maps names to (shape, dtype). With `full`, every expected name must be present. `aliases`: names
    that may stand in for several expected ones (stacked experts), each with its shape and the names it covers.
    """
    aliases = {name: aliases[name] for name in given if name in aliases} if aliases else {}
    covered = {name for _, names in aliases.values() for name in names}
    expected = {**expected, **{name: shape for name, (shape, _) in aliases.items()}}
    unexpected = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given) - set(aliases) - covered) if full else []
    wrong = [
        f"{name}: expected shape {list(expected[name])}, got {list(shape)}"
        for name, (shape, _) in given.items()
        if name in expected and tuple(shape) != tuple(expected[name])
    ]
    bad_dtype = [f"{name}: dtype {dtype}" for name, (_, dtype) in given.items() if not dtype.is_floating_point]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) the model does not have: {_head(unexpected)}")
    if wrong:
        problems.append(f"mismatched shapes: {_head(wrong)}")
    if bad_dtype:
        problems.append(f"tensors must be floating point: {_head(bad_dtype)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def nonfinite(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[str]:
    """Names of the tensors that hold NaN or Inf once cast to `dtype`: one max-magnitude reduction per tensor where
    it lives (NaN if it holds one), read back with one sync per device."""
    peaks: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors:
        if tensor.numel():
            peaks.setdefault(tensor.device, []).append((name, _peak(tensor.detach(), dtype)))
    bad = []
    for pairs in peaks.values():
        finite = torch.stack([peak for _, peak in pairs]).to(dtype).isfinite().tolist()
        bad += [name for (name, _), ok in zip(pairs, finite) if not ok]
    return bad


def _peak(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest magnitude in `tensor` (NaN if it holds one) as a float32 scalar on its device."""
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        tensor = tensor.to(dtype)  # float64 / float8: the norm cannot read them as float32, so cast a copy
    return torch.linalg.vector_norm(tensor, float("inf"), dtype=torch.float32)


def report_nonfinite(names: list[str], source: str, refuse: bool) -> None:
    """Raise CheckpointError (`refuse`) or warn (RuntimeWarning) when `names` of non-finite tensors is not empty."""
    if not names:
        return
    message = f"{source}: {len(names)} tensor(s) hold NaN or Inf: {_head(names)}"
    if refuse:
        raise CheckpointError(message)
    warnings.warn(f"{message} (check_finite_weights=True refuses such weights)", RuntimeWarning)


def _head(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
