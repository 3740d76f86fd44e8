"""The Triton attention backend against the reference backend on random paged layouts.

On a machine without CUDA the kernels run in Triton's interpreter (skipped when
Triton is not installed); on the device machine they run on the GPU.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")  # conftest selected the interpreter when there is no CUDA

from test_attention import paged_case  # noqa: E402
from worker.attention.reference import ReferenceBackend  # noqa: E402
from worker.attention.triton_backend import TritonBackend  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


def _to(meta, device):
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        setattr(meta, name, getattr(meta, name).to(device))
    return meta


def _run(backend, q, k, v, cache, meta, head_dim):
    backend.prepare(meta, block_size=cache.shape[2])
    return backend.forward(q, k, v, cache, meta, scale=head_dim**-0.5)


def _compare(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    q, k, v, cache, meta, _ = paged_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size,
                                         num_blocks=sum(-(-s // block_size) for s in seq_lens) + 3, seed=seed)
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    cache = cache.nan_to_num(nan=1e4).to(DEVICE, dtype)  # unwritten slots hold garbage that must not leak
    expected = _run(ReferenceBackend(), q, k, v, cache.clone(), _to(meta, DEVICE), head_dim)
    got_cache = cache.clone()
    got = _run(TritonBackend(DEVICE), q, k, v, got_cache, meta, head_dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    flat = got_cache.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[0, meta.slot_mapping], k) and torch.equal(flat[1, meta.slot_mapping], v)


DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (7, 1), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_kernel_matches_reference(num_heads, num_kv_heads, head_dim, dtype):
    """Prefill, chunked prefill with a cached prefix, and decode rows in one step; odd lengths."""
    seq_lens, q_lens = [1, 77, 133, 6, 20], [1, 77, 1, 3, 19]
    _compare(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, 16, dtype, seed=num_heads + head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (7, 1), (16, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_kernel_matches_reference(num_heads, num_kv_heads, block_size, dtype):
    """One token per sequence over random block tables; lengths from 1 to past several tiles."""
    seq_lens = [1, 300, 17, 64, 129]
    _compare(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, 64, block_size, dtype, seed=block_size)


@pytest.mark.parametrize("splits", [2, 4, 16])
def test_split_kv_decode_matches_one_split(splits):
    """Splitting long contexts (and splits that get no tokens on short ones) changes nothing but rounding."""
    from worker.kernels.attention import paged_decode_attention

    q, k, v, cache, meta, _ = paged_case([700, 3, 150], [1, 1, 1], 8, 2, 64, 16, num_blocks=60, seed=splits)
    cache, q = cache.nan_to_num(nan=0.0).to(DEVICE), q.to(DEVICE)
    meta = _to(meta, DEVICE)
    args = (q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.125)
    one = paged_decode_attention(*args, torch.empty_like(q), splits=1)
    many = paged_decode_attention(*args, torch.empty_like(q), splits=splits)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)


def test_padded_decode_rows_give_zeros_and_skip_the_cache():
    """CUDA-graph padding: seq_len 0 and slot -1 rows write nothing and return zeros."""
    q, k, v, cache, meta, _ = paged_case([5, 9], [1, 1], 4, 2, 64, 16, num_blocks=4, seed=3)
    cache = cache.nan_to_num(nan=0.0).to(DEVICE)
    meta = _to(meta, DEVICE)
    meta.seq_lens[1], meta.slot_mapping[1] = 0, -1
    before = cache.clone()
    out = _run(TritonBackend(DEVICE), q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache, meta, 64)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    flat, old = cache.view(2, -1, 2, 64), before.view(2, -1, 2, 64)
    changed = (flat != old).any(-1).any(-1).nonzero()[:, 1].unique().tolist()
    assert changed == [meta.slot_mapping[0].item()]
