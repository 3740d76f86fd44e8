"""How a worker checks and applies a weight update announced over a transfer group.

Checkpoint format: Hugging Face names, mapped into the fused parameters tensor by
tensor as each bucket arrives. Kernel format: the engine's own parameter names,
copied as they are; when the update is the whole weight arena in its own layout,
each bucket is received straight into live memory and nothing is staged.
"""

from __future__ import annotations

from numbers import Integral
from typing import Callable, Optional

import torch

from weight_sync.buckets import Bucket, flat_offsets, slot_view
from weight_sync.protocol import UpdateInfo, torch_dtype
from worker.loader import check_tensors
from worker.memory.pool import WEIGHTS, MemoryPool
from worker.models.llama import CausalLM
from worker.parallel import TensorParallel


def requested_version(version: object, serving: int) -> int:
    """The version an in-process update will serve as: `version` (an int newer than `serving`) or, for None,
    `serving + 1`; else ValueError."""
    if version is None:
        return serving + 1
    if isinstance(version, bool) or not isinstance(version, Integral):
        raise ValueError(f"version must be an int (or None for weight_version + 1), got {version!r}")
    if version <= serving:
        raise ValueError(f"version {version} is not newer than the serving weight_version {serving}")
    return int(version)


def kernel_names(update: UpdateInfo, tp: TensorParallel) -> dict[str, str]:
    """Update name -> this rank's parameter name, for a kernel-format update.

    Without tensor parallelism names are the parameters'. With it, each rank's
    shard is named "rank<k>/<parameter>": every rank receives them all (one
    broadcast) and applies its own.
    """
    if tp.size == 1:
        return {t.name: t.name for t in update.tensors}
    mine = f"rank{tp.rank}/"
    return {t.name: t.name[len(mine):] for t in update.tensors if t.name.startswith(mine)}


def check_update(model: CausalLM, pool: MemoryPool, update: UpdateInfo, min_version: int,
                 tp: TensorParallel = TensorParallel()) -> None:
    """Raise ValueError (CheckpointError for tensor problems) unless `update` can be applied."""
    if update.version < min_version:
        raise ValueError(f"update version {update.version} is not newer than the serving weight_version "
                         f"{min_version - 1}")
    if WEIGHTS in pool.asleep():
        raise ValueError("the engine's weights are asleep; call wake_up(tags=['weights']) before updating them")
    given = {t.name: (t.shape, torch_dtype(t.dtype)) for t in update.tensors}
    source = f"update version {update.version} ({update.format} format)"
    if update.format == "checkpoint":
        expected = model.checkpoint_shapes()
        if model.tie_word_embeddings and "lm_head.weight" in given:
            expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    elif tp.size == 1:
        expected = {entry.name: entry.shape for entry in pool.weight_layout}
    else:
        expected = {f"rank{k}/{e.name}": e.shape for k in range(tp.size) for e in pool.weight_layout}
        source += f" with tensor_parallel_size={tp.size}, where names are rank<k>/<parameter>"
    aliases = model.checkpoint_aliases() if update.format == "checkpoint" else None
    check_tensors(expected, given, full=not update.partial, source=source, aliases=aliases)


def touched_names(model: CausalLM, update: UpdateInfo, tp: TensorParallel) -> set[str]:
    """Checkpoint names (canonical) of every tensor the update writes to on this rank."""
    if update.format == "checkpoint":
        return {covered for t in update.tensors for covered in model.covered_names(t.name)}
    kernel = set(kernel_names(update, tp).values())
    return {name for name in model.checkpoint_shapes() if model.map_name(name)[0] in kernel}


def make_apply(model: CausalLM, update: UpdateInfo, tp: TensorParallel) -> Callable[[Bucket, torch.Tensor], None]:
    """Copy one received bucket's tensors (this rank's) into the live parameters (casting dtypes)."""
    if update.format == "checkpoint":
        def apply(bucket: Bucket, data: torch.Tensor) -> None:
            model.load_weights((slot.meta.name, slot_view(data, slot)) for slot in bucket.slots)
        return apply
    params = dict(model.named_parameters())
    names = kernel_names(update, tp)

    def apply_kernel(bucket: Bucket, data: torch.Tensor) -> None:
        for slot in bucket.slots:
            if slot.meta.name in names:
                params[names[slot.meta.name]].data.copy_(slot_view(data, slot), non_blocking=True)
    return apply_kernel


def direct_target(pool: MemoryPool, update: UpdateInfo) -> Optional[Callable[[Bucket], torch.Tensor]]:
    """For a full kernel-format update in the arena's own layout: where each bucket lands in the arena."""
    layout = pool.weight_layout
    if update.format != "kernel" or update.partial or len(update.tensors) != len(layout):
        return None
    same = all(
        t.name == e.name and t.shape == e.shape and torch_dtype(t.dtype) == e.dtype and offset == e.offset
        for t, e, offset in zip(update.tensors, layout, flat_offsets(update.tensors))
    )
    if not same:
        return None
    arena = pool.arenas[WEIGHTS].data
    return lambda bucket: arena[bucket.start : bucket.start + bucket.size]
