"""The bucket layout and the protocol messages, checked against hand-computed values."""

import pytest
import torch
from pydantic import ValidationError

from rollout import UpdateInfo
from sync_helpers import engine_for
from trainer_adapters import tensor_metas
from weight_sync import TensorMeta, flat_offsets, plan_buckets
from weight_sync.buckets import auto_bucket_bytes, slot_view
from worker.updates import direct_target


def meta(name, dtype, *shape):
    return TensorMeta(name=name, dtype=dtype, shape=shape)


def test_buckets_cut_at_tensor_boundaries_with_aligned_offsets():
    tensors = [meta("a", "float32", 3, 5), meta("b", "bfloat16", 100), meta("c", "float32", 1000),
               meta("d", "float16", 10)]
    assert [t.nbytes for t in tensors] == [60, 200, 4000, 20]
    assert flat_offsets(tensors) == [0, 256, 512, 4608]
    buckets = plan_buckets(tensors, bucket_bytes=1024)
    assert [(b.start, b.size) for b in buckets] == [(0, 456), (512, 4000), (4608, 20)]
    assert [[(s.index, s.offset) for s in b.slots] for b in buckets] == [[(0, 0), (1, 256)], [(2, 0)], [(3, 0)]]
    assert len(plan_buckets(tensors, bucket_bytes=1 << 20)) == 1


def test_slot_views_round_trip_random_tensors():
    values = [torch.randn(3, 5), torch.randn(7).to(torch.bfloat16), torch.randn(2, 2, 2).to(torch.float16)]
    metas = [TensorMeta.of(f"t{i}", v) for i, v in enumerate(values)]
    (bucket,) = plan_buckets(metas, bucket_bytes=1 << 20)
    buffer = torch.zeros(bucket.size, dtype=torch.uint8)
    for slot, value in zip(bucket.slots, values):
        slot_view(buffer, slot).copy_(value)
    for slot, value in zip(bucket.slots, values):
        assert torch.equal(slot_view(buffer, slot), value)


def test_update_info_rejects_bad_fields():
    good = dict(version=1, tensors=[dict(name="w", dtype="float32", shape=[2])])
    cases = [
        (dict(version=0), "greater than or equal to 1"),
        (dict(version="5"), "valid integer"),
        (dict(version=True), "valid integer"),
        (dict(tensors=[dict(name="w", dtype="int64", shape=[2])]), "floating point"),
        (dict(tensors=[dict(name="w", dtype="float32", shape=[-1])]), ">= 0"),
        (dict(tensors=good["tensors"] * 2), "repeated: ['w']"),
        (dict(format="fp8"), "'checkpoint' or 'kernel'"),
        (dict(tensors=[]), "at least 1"),
    ]
    for change, message in cases:
        with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("(", r"\(")):
            UpdateInfo(**{**good, **change})


def test_sender_refuses_integer_tensors_before_announcing():
    with pytest.raises(ValueError, match="floating dtype"):
        tensor_metas({"ids": torch.arange(4)})


def test_whole_arena_kernel_update_lands_in_place(checkpoint_dir):
    engine = engine_for(checkpoint_dir("llama3"))
    pool = engine.worker.pool
    params = dict(engine.worker.model.named_parameters())
    layout = [TensorMeta.of(e.name, params[e.name]) for e in pool.weight_layout]
    assert flat_offsets(layout) == [e.offset for e in pool.weight_layout]
    full = UpdateInfo(version=1, format="kernel", tensors=layout, bucket_bytes=4096)
    target = direct_target(pool, full)
    assert target is not None
    buckets = plan_buckets(layout, 4096)
    first = buckets[0].slots[0].meta.name
    assert target(buckets[0]).data_ptr() == params[first].data_ptr()
    assert direct_target(pool, full.model_copy(update=dict(tensors=layout[::-1]))) is None
    assert direct_target(pool, full.model_copy(update=dict(partial=True))) is None
    assert direct_target(pool, full.model_copy(update=dict(format="checkpoint"))) is None


def test_automatic_bucket_size_is_an_eighth_within_bounds():
    def of_total(nbytes):
        return auto_bucket_bytes([meta("w", "bfloat16", nbytes // 2)])

    assert of_total(4 << 30) == 512 << 20
    assert of_total(1 << 30) == 256 << 20
    assert of_total(16 << 30) == 1 << 30


def test_kernel_update_under_tensor_parallel_names_each_ranks_shard(checkpoint_dir):
    from transformers import AutoConfig

    from rollout import CheckpointError
    from worker.memory import MemoryPool
    from worker.models.registry import build_model
    from worker.parallel import TensorParallel
    from worker.updates import check_update, kernel_names

    tp = TensorParallel(rank=1, size=2)
    config = AutoConfig.from_pretrained(checkpoint_dir("qwen3"))
    with torch.device("meta"):
        model = build_model(config, 64, tp)
    pool = MemoryPool(torch.device("cpu"), sleepable=False)
    pool.place_parameters(model)
    plain = [meta(e.name, "float32", *e.shape) for e in pool.weight_layout]
    with pytest.raises(CheckpointError, match="names are rank<k>/<parameter>"):
        check_update(model, pool, UpdateInfo(version=1, format="kernel", tensors=plain), 1, tp)
    ranked = [meta(f"rank{k}/{m.name}", "float32", *m.shape) for k in range(2) for m in plain]
    update = UpdateInfo(version=1, format="kernel", tensors=ranked)
    check_update(model, pool, update, 1, tp)
    assert kernel_names(update, tp) == {f"rank1/{e.name}": e.name for e in pool.weight_layout}
