"""Shared pieces of the GRPO examples: a tiny task, its reward, the GRPO loss, and the trainer.

The task: after any prompt, emit token TARGET as often as possible (reward =
the fraction of generated tokens that are TARGET). A randomly initialised model
emits it about 1/VOCAB of the time; GRPO raises that within a few steps, on a
CPU or a GPU.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Optional

import torch

from rollout.demo import quiet_transformers

TARGET = 7
VOCAB = 64


def make_checkpoint(path: Path, seed: int = 0) -> str:
    """A tiny random Qwen3 model saved as a real Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    with quiet_transformers():
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


def connect(trainer, engine, backend: str) -> None:
    """Start the trainer's and the engine's halves of a weight-transfer group together."""
    import ray

    from weight_sync import TransferInitInfo, run_together

    host, port = ray.get(trainer.address.remote())
    info = TransferInitInfo(backend=backend, master_address=host, master_port=port,
                            world_size=1 + engine.num_workers)
    run_together(lambda: ray.get(trainer.join.remote(info.model_dump())), lambda: engine.init_weight_transfer(info))


def sync(trainer, engine, version: int, dtype: Optional[str]) -> float:
    """Send the trainer's weights to every engine worker; returns the seconds taken."""
    import ray

    from weight_sync import run_together

    start = time.perf_counter()
    run_together(lambda: ray.get(trainer.send.remote(version, dtype)), lambda: engine.update_weights())
    return time.perf_counter() - start


def make_prompts(count: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(8, VOCAB) for _ in range(4)] for _ in range(count)]


def rollout(engine, rng: random.Random, prompts: int, samples: int) -> tuple[list[list[int]], list, float]:
    """Sample `samples` completions (with logprobs) for `prompts` fresh prompts; returns them and the seconds."""
    from rollout import SamplingParams

    params = SamplingParams(n=samples, temperature=1.0, max_tokens=16, ignore_eos=True, logprobs=True)
    batch = make_prompts(prompts, rng)
    start = time.perf_counter()
    outputs = engine.generate(batch, params, use_tqdm=False)
    return batch, outputs, time.perf_counter() - start


def reward(tokens: list[int]) -> float:
    return sum(t == TARGET for t in tokens) / max(len(tokens), 1)


def grpo_batch(prompts: list[list[int]], outputs) -> tuple[list[tuple], float]:
    """(prompt, completion, rollout logprobs, advantage) per sample, and the mean reward.

    Advantages are the rewards normalised within each prompt's group of samples.
    """
    batch, rewards = [], []
    for prompt, out in zip(prompts, outputs):
        scores = torch.tensor([reward(s.token_ids) for s in out.samples])
        rewards += scores.tolist()
        advantages = (scores - scores.mean()) / (scores.std() + 1e-4) if len(scores) > 1 else scores * 0
        for sample, advantage in zip(out.samples, advantages.tolist()):
            batch.append((prompt, sample.token_ids, sample.logprobs, advantage))
    return batch, sum(rewards) / len(rewards)


def grpo_loss(model, batch: list[tuple], device: torch.device, clip: float = 0.2) -> torch.Tensor:
    """Clipped policy-gradient loss; the importance ratio uses the rollout's own logprobs."""
    width = max(len(p) + len(c) for p, c, _, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    old = torch.zeros(len(batch), width - 1)
    mask = torch.zeros(len(batch), width - 1)
    advantages = torch.tensor([a for _, _, _, a in batch]).unsqueeze(1)
    for row, (prompt, completion, logprobs, _) in enumerate(batch):
        ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        old[row, span] = torch.tensor(logprobs)
        mask[row, span] = 1.0
    ids, old, mask, advantages = (t.to(device) for t in (ids, old, mask, advantages))
    logits = model(input_ids=ids).logits[:, :-1]  # right padding: causal attention never sees it
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    objective = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -(objective * mask).sum() / mask.sum()


class Trainer:
    """The policy in training: a transformers model, AdamW, and a WeightSender to the engine.

    Wrapped with `ray.remote` by the examples (one actor, on its own or a shared GPU).
    """

    def __init__(self, checkpoint: str, lr: float = 1e-2, device: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with quiet_transformers():
            self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.sender = None

    def address(self) -> tuple[str, int]:
        """This node's address and a free port, where the weight-transfer group's store will listen."""
        import socket

        from weight_sync import free_port

        host = socket.gethostbyname(socket.gethostname())
        return host, free_port(host)

    def join(self, init_info: dict) -> None:
        from trainer_adapters import TransferInitInfo, WeightSender

        if self.sender is not None:
            self.sender.close()
        self.sender = WeightSender(TransferInitInfo(**init_info))

    def train(self, batch: list[tuple]) -> dict:
        """One optimizer step on a GRPO batch; returns the loss and the seconds taken."""
        start = time.perf_counter()
        self.model.train()
        loss = grpo_loss(self.model, batch, self.device)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._sync()
        return {"loss": loss.item(), "seconds": time.perf_counter() - start}

    def send(self, version: int, dtype: Optional[str] = None) -> float:
        """Send the weights (checkpoint format) as `version`; returns the seconds taken."""
        start = time.perf_counter()
        self.sender.send(self.model, version=version, dtype=getattr(torch, dtype) if dtype else None)
        return time.perf_counter() - start

    def free_gpu_memory(self) -> None:
        """Let a colocated engine have the memory the optimizer step left cached."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def peak_memory_gib(self) -> float:
        """This process's peak device memory since the last call (CUDA), then reset."""
        if self.device.type != "cuda":
            return 0.0
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
