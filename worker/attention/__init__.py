"""Attention backends over the paged KV cache."""

from worker.attention.backend import AttentionBackend, AttentionMetadata
from worker.attention.select import get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
