"""Building blocks of the decoder models, numerically matched to transformers."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from worker import kernels
from worker.parallel import TensorParallel

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Optional[object]], None]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: Optional[object] = None) -> None:
    """Copy a whole checkpoint tensor into a parameter (casting its dtype)."""
    param.data.copy_(loaded)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, like transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_for(x) and x.dim() == 2:
            from worker.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm of `x + residual` (summed in x's dtype, like transformers); returns (normed, the sum)."""
        if kernels.use_for(x):
            from worker.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        total = x + residual
        return self.forward(total), total


class FusedLinear(nn.Module):
    """A column-parallel linear layer whose output rows are several checkpoint tensors stacked.

    `shards` maps a shard id (e.g. "q", "k", "v" or 0, 1) to its full output size,
    in order. Each rank holds its slice of every shard (rows rank*n/tp .. (rank+1)*n/tp),
    and the checkpoint's separate projections load into their row ranges.
    """

    def __init__(self, in_features: int, shards: dict[object, int], bias: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.full: dict[object, int] = dict(shards)
        self.offsets: dict[object, tuple[int, int]] = {}
        start = 0
        for shard, size in shards.items():
            local = tp.split(size, f"the {shard!r} projection's {size} rows")
            self.offsets[shard] = (start, local)
            start += local
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.weight.weight_loader = self.load_shard
        self.bias = nn.Parameter(torch.empty(start)) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_shard

    def shard_shape(self, param: nn.Parameter, shard: object) -> tuple[int, ...]:
        """Checkpoint shape of one shard of `param`."""
        return (self.full[shard], *param.shape[1:])

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: Optional[object]) -> None:
        start, size = self.offsets[shard]
        param.data.narrow(0, start, size).copy_(loaded.narrow(0, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """A linear layer whose input columns are split over the ranks; the partial outputs are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, reduce: bool = True):
        super().__init__()
        self.tp = tp
        self.reduce = reduce  # False: return this rank's partial sum (the caller reduces it with others)
        self.weight = nn.Parameter(torch.empty(out_features, tp.split(in_features, "the input size")))
        self.weight.weight_loader = self.load
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def checkpoint_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        return (param.shape[0], param.shape[1] * self.tp.size) if param is self.weight else tuple(param.shape)

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: Optional[object] = None) -> None:
        local = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * local, local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight)
        if not self.reduce:
            assert self.bias is None, "a partial sum cannot carry the bias"
            return out
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallel(nn.Module):
    """Rows of a [vocab, hidden] table split over the ranks: the embedding and the LM head."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.local = tp.split(vocab_size, "the vocabulary size")
        self.start = tp.rank * self.local
        self.weight = nn.Parameter(torch.empty(self.local, hidden_size))
        self.weight.weight_loader = self.load

    def checkpoint_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        return (self.local * self.tp.size, param.shape[1])

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: Optional[object] = None) -> None:
        param.data.copy_(loaded.narrow(0, self.start, self.local))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.local)
        out = F.embedding(torch.where(mine, ids - self.start, 0), self.weight) * mine.unsqueeze(-1)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(F.linear(hidden, self.weight))


class MLP(nn.Module):
    """SiLU-gated MLP: `gate_up_proj` (gate and up rows fused, column parallel), `down_proj` (row parallel).

    `reduce=False` leaves the down projection's partial sum unreduced (the caller all-reduces it).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, tp: TensorParallel, reduce: bool = True):
        super().__init__()
        size = intermediate_size
        self.gate_up_proj = FusedLinear(hidden_size, {0: size, 1: size}, bias, tp)
        self.down_proj = RowParallelLinear(size, hidden_size, bias, tp, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [.., 2 * I] gate_up projection."""
    if kernels.use_for(x) and x.dim() == 2:
        from worker.kernels.fused import silu_and_mul as fused

        return fused(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies for the rope parameters of a config ('default' and 'llama3')."""
    base = float(rope.get("rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: 'default', 'llama3'")


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with cos/sin tables for every position.

    The tables are non-weight buffers, computed on the CPU (also when the model is
    built on the meta device); the worker moves them to the model's device.
    """

    def __init__(self, head_dim: int, max_positions: int, rope: dict):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
