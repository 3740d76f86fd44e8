"""Multi-turn agent GRPO through `rollout serve`: rollouts with the `openai` client, token ids from the responses,
weights pushed to the server after each step over the control routes.

    python examples/agent_grpo.py [--steps 12] [--cpu]

The server runs as its own process (`rollout serve`, like a deployment); this process is the agent harness and
the trainer. An episode: the user asks for a sum; the assistant answers (tools rendered by the chat template);
the calculator runs (on the assistant's `<tool_call>` when it wrote one, else on the question, which a random
policy needs) and its result goes back as a tool message; the assistant answers again. The second turn passes the
first turn's ids back as `prefix_token_ids`, so the trainer sees exactly the tokens sampled (nothing
re-tokenized). Reward: the share of the assistant's tokens that are arithmetic ("0"-"9", "+", "-", "*", "/",
"="); GRPO raises it within a few steps. Weights go to the server over gloo on a CPU, CUDA IPC on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

from rollout.demo import EOS_TOKEN, build_tokenizer, quiet_transformers
from weight_sync import TransferInitInfo, free_port, run_together

# ChatML with tools in a <tools> block, the shape of Qwen's templates
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate a sum of two integers.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
ARITHMETIC = set("0123456789+-*/=")


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random Qwen3 with the demo's byte-level tokenizer and a ChatML template."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    with quiet_transformers():
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def calculator(expression: str) -> str:
    """The sum or difference of two integers (no eval: anything else is an error message)."""
    match = re.fullmatch(r"\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*", expression or "")
    if match is None:
        return "error: expected 'a + b' or 'a - b'"
    a, op, b = match.groups()
    return str(int(a) + int(b) if op == "+" else int(a) - int(b))


class Harness:
    """The agent side: episodes through the server's chat route, with the checkpoint's tokenizer for rewards."""

    def __init__(self, url: str, model: str, tokenizer):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        self.model, self.tokenizer = model, tokenizer
        self.end_of_turn = "<|im_end|>"
        self.stop_ids = [tokenizer.convert_tokens_to_ids(self.end_of_turn)]
        self.arithmetic = {i for i in range(len(tokenizer)) if set(tokenizer.decode([i]).strip()) <= ARITHMETIC
                           and tokenizer.decode([i]).strip()}

    def turn(self, messages, seed: int, prefix=None):
        extra = dict(return_token_ids=True, stop_token_ids=self.stop_ids, prefix_token_ids=prefix)
        reply = self.client.chat.completions.create(model=self.model, messages=messages, tools=TOOLS, seed=seed,
                                                    max_tokens=12, temperature=1.0, logprobs=True, extra_body=extra)
        return reply.choices[0]

    def said(self, token_ids: list[int]) -> str:
        """A turn's text as the model wrote it (special tokens too), less the end of turn the template adds back:
        rendered again, it decodes to the same tokens, so the server can reuse them as `prefix_token_ids`."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        return text.removesuffix(self.end_of_turn)

    def episode(self, a: int, b: int, seed: int) -> dict:
        """Two assistant turns around a calculator call; the sampled tokens, their logprobs and the reward."""
        messages = [{"role": "user", "content": f"What is {a} + {b}?"}]
        first = self.turn(messages, seed)
        calls = first.message.tool_calls or []
        expression = json.loads(calls[0].function.arguments).get("expression") if calls else f"{a} + {b}"
        said = self.said(first.token_ids)
        messages += [{"role": "assistant", "content": said}, {"role": "tool", "content": calculator(expression)}]
        second = self.turn(messages, seed + 1, prefix=first.prompt_token_ids + first.token_ids)
        start = len(first.prompt_token_ids)
        sampled = [(start + k, t, lp.logprob) for k, (t, lp) in enumerate(zip(first.token_ids,
                                                                              first.logprobs.content))]
        start = len(second.prompt_token_ids)
        sampled += [(start + k, t, lp.logprob) for k, (t, lp) in enumerate(zip(second.token_ids,
                                                                               second.logprobs.content))]
        reward = sum(t in self.arithmetic for _, t, _ in sampled) / max(len(sampled), 1)
        return {"ids": second.prompt_token_ids + second.token_ids, "sampled": sampled, "reward": reward,
                "tool_call": bool(calls)}


def grpo_loss(model, episodes: list[dict], advantages: list[float], clip: float = 0.2) -> torch.Tensor:
    """Clipped policy gradient over the sampled tokens only (the template's and the tool's tokens are context)."""
    width = max(len(e["ids"]) for e in episodes)
    ids = torch.zeros(len(episodes), width, dtype=torch.long)
    old, mask = torch.zeros(len(episodes), width - 1), torch.zeros(len(episodes), width - 1)
    for row, e in enumerate(episodes):
        ids[row, :len(e["ids"])] = torch.tensor(e["ids"])
        for position, _, logprob in e["sampled"]:
            old[row, position - 1], mask[row, position - 1] = logprob, 1.0  # logits at i predict token i + 1
    device = next(model.parameters()).device
    ids, old, mask = ids.to(device), old.to(device), mask.to(device)
    adv = torch.tensor(advantages, device=device).unsqueeze(1)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    ratio = torch.exp(logp - old)
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -(objective * mask).sum() / mask.sum()


def start_server(checkpoint: Path, port: int, device: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "rollout.cli", "serve", "--model", str(checkpoint), "--port", str(port),
               "--device", device, "--dtype", "float32", "--log-level", "warning"]
    if device == "cuda":
        command += ["--engine-args", json.dumps({"gpu_memory_utilization": 0.3})]
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's rollout, also when not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("rollout serve did not come up")
        time.sleep(0.2)


def main(steps: int = 12, cpu: bool = False, questions: int = 4, group: int = 4, seed: int = 0) -> list[dict]:
    """Run agent GRPO for `steps`; returns per step the mean reward and how many episodes' tool calls came from
    the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer_adapters import WeightSender

    gpu = not cpu and torch.cuda.is_available()
    checkpoint = make_checkpoint(Path(tempfile.mkdtemp(prefix="agent-grpo-")) / "policy", seed)
    port = free_port()
    server = start_server(checkpoint, port, "cuda" if gpu else "cpu")
    url = f"http://127.0.0.1:{port}"
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to("cuda" if gpu else "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        harness = Harness(url, "policy", AutoTokenizer.from_pretrained(checkpoint))
        info = TransferInitInfo.local("ipc" if gpu else "gloo", timeout_s=120)
        init = {"init_info": {**info.model_dump(mode="json"), "secret": info.secret.get_secret_value()}}
        sender, _ = run_together(lambda: WeightSender(info),
                                 lambda: httpx.post(f"{url}/init_weight_transfer", json=init, timeout=300)
                                 .raise_for_status())
        rng, history = random.Random(seed), []
        for step in range(steps):
            episodes, advantages = [], []
            for q in range(questions):
                a, b = rng.randrange(100), rng.randrange(100)
                runs = [harness.episode(a, b, seed=rng.randrange(2**31)) for _ in range(group)]
                rewards = torch.tensor([r["reward"] for r in runs])
                advantages += ((rewards - rewards.mean()) / (rewards.std() + 1e-4)).tolist()
                episodes += runs
            model.train()
            loss = grpo_loss(model, episodes, advantages)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run_together(lambda: sender.send(model, version=step + 1),
                         lambda: httpx.post(f"{url}/update_weights", json={}, timeout=300).raise_for_status())
            mean = sum(e["reward"] for e in episodes) / len(episodes)
            calls = sum(e["tool_call"] for e in episodes)
            history.append({"reward": mean, "model_tool_calls": calls})
            print(f"step {step:3d}  reward {mean:.3f}  loss {loss.item():+.4f}  tool calls by the model {calls}/"
                  f"{len(episodes)}", flush=True)
        sender.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return history


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cpu", action="store_true", help="ignore GPUs")
    args = parser.parse_args()
    main(args.steps, args.cpu)
