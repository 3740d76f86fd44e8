"""A self-contained demo: a small random Qwen3 checkpoint with its own tokenizer, and a timed rollout on it.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the text below,
the weights are random (seeded), so the samples are fluent-looking gibberish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

DEMO_NAME = "demo-qwen3-v1"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 1024
SEED = 1234
WEIGHT_STD = 0.25  # large enough for peaked (non-uniform) next-token distributions
MODEL_FIELDS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)

CORPUS = """\
Reinforcement learning from feedback trains a language model in two alternating phases. In the rollout
phase the current policy samples several completions for every prompt, and the engine records the exact
log probability of each sampled token. In the training phase a reward model or a verifier scores the
completions, the trainer compares the new policy with the old one, and the weights move a small step.
Then the fresh weights are copied back into the rollout engine, and the next batch of prompts begins.

The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the green valley.
Every morning she walks to the old bakery on the corner, buys warm bread and a cup of strong coffee,
and reads the newspaper before the shop gets busy. On rainy days the streets are quiet, the river
runs high under the stone bridge, and children splash through puddles on their way to school.

A paged key-value cache splits the memory of each sequence into fixed blocks, so that many requests of
different lengths can share one large pool without waste. Continuous batching adds new sequences as soon
as old ones finish, which keeps the hardware busy. When two prompts start with the same words, their
first blocks can be shared through a prefix cache, and the shared part is computed only once.

Mathematics asks simple questions with surprising answers. What is the sum of the first hundred numbers?
Why does a prime number have exactly two divisors? How many ways can eight queens stand on a chessboard
without attacking each other? A good student writes each step carefully, checks the result, and explains
the reasoning in plain words, because a correct answer without a clear argument convinces nobody.

The weather report promised sunshine, but by noon heavy clouds rolled in from the western mountains.
Travellers waited at the station, reading timetables, drinking tea, and talking about their journeys to
distant cities. A musician played the violin near the entrance, a dog slept beside his open case, and
the evening train finally arrived, twenty minutes late, with its windows glowing in the dark.

Temperature controls how adventurous sampling is: at zero the model always picks the most likely token,
at one it follows its own distribution, and higher values flatten the distribution further. Nucleus
sampling keeps the smallest set of tokens whose probabilities add up to top p, and top k keeps only the
k most likely tokens. A fixed seed makes every sample reproducible, whatever else runs in the same batch.
"""

DEMO_PROMPTS = [
    "The quick brown fox",
    "In the rollout phase the policy",
    "Every morning she walks to",
    "What is the sum of the first hundred numbers?",
    "The weather report promised",
    "A paged key-value cache",
    "Temperature controls how",
    "The evening train finally arrived,",
]


def default_demo_dir() -> Path:
    """Where the demo checkpoint is cached: `$ROLLOUT_CACHE` or ~/.cache/rollout-engine, then `demo-qwen3-v1`."""
    root = os.environ.get("ROLLOUT_CACHE") or Path.home() / ".cache" / "rollout-engine"
    return Path(root) / DEMO_NAME


def is_complete(path: Path) -> bool:
    """True when `path` holds a finished checkpoint (config, weights and tokenizer)."""
    return all((Path(path) / name).is_file() for name in REQUIRED_FILES)


def ensure_demo_checkpoint(path: Optional[Path] = None) -> Path:
    """The demo checkpoint at `path` (default: `default_demo_dir()`), built there on first use."""
    path = Path(path) if path is not None else default_demo_dir()
    return path if is_complete(path) else build_demo_checkpoint(path)


def build_demo_checkpoint(path: Path) -> Path:
    """Build the random Qwen3 checkpoint and its tokenizer at `path`, atomically; returns `path`.

    Everything is written to a temporary directory beside `path` and renamed into
    place, so a crash never leaves a half-built checkpoint behind. If another
    process finished the same checkpoint first, its copy is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o755)
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(tmp)
        model = _build_model(len(tokenizer), tokenizer.convert_tokens_to_ids(EOS_TOKEN))
        with quiet_transformers():
            model.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_complete(path):
                raise FileExistsError(f"{path} exists but is not a complete demo checkpoint; remove it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tokenizer():
    """A byte-level BPE (about VOCAB_SIZE tokens) trained on CORPUS, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=2048
    )


def _build_model(vocab_size: int, eos_token_id: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=eos_token_id, bos_token_id=None,
        architectures=["Qwen3ForCausalLM"], **MODEL_FIELDS,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else WEIGHT_STD * noise)
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars ("Writing model shards", "Loading weights") for the duration.

    Wrap one `save_pretrained` / `from_pretrained` call; the previous setting is restored after.
    """
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def run_demo(
    model_dir: Optional[Path] = None,
    num_prompts: int = 8,
    n: int = 4,
    max_tokens: int = 64,
    device: str = "cpu",
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Sample `n` completions of `num_prompts` prompts, print what happened, return a summary dict.

    `model_dir` None uses the cached demo checkpoint (built on first use); any
    checkpoint directory with a tokenizer works too (one without raises CheckpointError).
    """
    from rollout.engine import RolloutEngine
    from rollout.sampling_params import SamplingParams

    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    is_demo = model_dir is None
    model_dir = ensure_demo_checkpoint() if is_demo else Path(model_dir)
    if not is_demo:
        _check_has_tokenizer(model_dir)
    params = [SamplingParams(n=n, temperature=1.0, top_p=0.95, max_tokens=max_tokens, logprobs=True, seed=i)
              for i in range(num_prompts)]
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(num_prompts)]
    engine = RolloutEngine(model=str(model_dir), device=device)
    try:
        start = time.perf_counter()
        outputs = engine.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        summary = _summarize(engine, model_dir, outputs, wall)
        _report(summary, params[0], print_fn)
        _report_sample(outputs[0], engine.tokenizer, print_fn, "random weights, so expect gibberish" if is_demo else "")
    finally:
        engine.shutdown()
    return summary


def _check_has_tokenizer(model_dir: Path) -> None:
    """CheckpointError unless the checkpoint ships a tokenizer: the demo's prompts are text."""
    from rollout.validation import load_tokenizer
    from worker.errors import CheckpointError

    if load_tokenizer(model_dir) is None:
        raise CheckpointError(f"{model_dir} has no tokenizer (tokenizer.json), and the demo samples from text "
                              "prompts; pick a checkpoint that ships one, or leave out --model for the demo's own")


def _summarize(engine, model_dir: Path, outputs, wall: float) -> dict:
    samples = [s for out in outputs for s in out.samples]
    output_tokens = sum(len(s.token_ids) for s in samples)
    return dict(
        model_dir=str(model_dir),
        architecture=(engine.worker.hf_config.architectures or ["?"])[0],
        num_params=sum(p.numel() for p in engine.worker.model.parameters()),
        device=str(engine.worker.device),
        dtype=str(engine.worker.dtype).removeprefix("torch."),
        num_requests=len(outputs),
        num_samples=len(samples),
        prompt_tokens=sum(len(out.prompt_token_ids) for out in outputs),
        output_tokens=output_tokens,
        wall_s=wall,
        tokens_per_s=output_tokens / wall,
        finish_reasons=dict(Counter(s.finish_reason for s in samples)),
    )


def _report(summary: dict, params, print_fn) -> None:
    s = summary
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(s["finish_reasons"].items()))
    print_fn(f"model     {s['model_dir']}")
    print_fn(f"          {s['architecture']}, {s['num_params'] / 1e6:.2f}M parameters")
    print_fn(f"device    {s['device']}, {s['dtype']}")
    print_fn(f"requests  {s['num_requests']} prompts x n={params.n} = {s['num_samples']} samples "
             f"(temperature {params.temperature}, top_p {params.top_p}, max_tokens {params.max_tokens})")
    print_fn(f"tokens    {s['prompt_tokens']} prompt, {s['output_tokens']} generated")
    print_fn(f"time      {s['wall_s']:.2f} s wall, {s['tokens_per_s']:.0f} generated tokens/s")
    print_fn(f"finished  {reasons}")


def _report_sample(output, tokenizer, print_fn, note: str, count: int = 5) -> None:
    sample = output.samples[0]
    prompt = tokenizer.decode(output.prompt_token_ids) if tokenizer is not None else output.prompt_token_ids
    print_fn(f"sample 0 of request {output.request_id}" + (f" ({note})" if note else "") + ":")
    print_fn(f"  prompt      {prompt!r}")
    print_fn(f"  completion  {sample.text!r}")
    pairs = zip(sample.token_ids[:count], sample.logprobs or [])
    print_fn("  first tokens (id: logprob)  " + ", ".join(f"{t}: {lp:.3f}" for t, lp in pairs))
