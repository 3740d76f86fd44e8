"""Reading Hugging Face safetensors checkpoints and checking tensors against a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from worker.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (root / s).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [root / s for s in shards]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in checkpoint directory {root}")
    return files


def checkpoint_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the files, read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def iter_checkpoint(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs from the files, one file open at a time."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    given: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
    full: bool,
    source: str,
) -> None:
    """Raise CheckpointError unless every given tensor is known, well-shaped and castable.

    `given` maps names to (shape, dtype); dtype None skips the dtype check. With
    `full`, every expected name must be present.
    """
    unexpected = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given)) if full else []
    wrong = [
        f"{name}: expected shape {list(expected[name])}, got {list(shape)}"
        for name, (shape, _) in given.items()
        if name in expected and tuple(shape) != tuple(expected[name])
    ]
    bad_dtype = [f"{name}: dtype {dtype}" for name, (_, dtype) in given.items() if dtype and not dtype.is_floating_point]
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


def _head(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
