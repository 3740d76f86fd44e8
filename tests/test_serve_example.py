"""examples/agent_grpo.py runs on CPU: multi-turn episodes through `rollout serve` (a subprocess) with the openai
client, weights pushed over the control routes after each step, and the policy learns."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "agent_grpo.py"


def test_agent_grpo_learns_through_the_server():
    spec = importlib.util.spec_from_file_location("agent_grpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(steps=8, cpu=True)
    rewards = [h["reward"] for h in history]
    assert len(rewards) == 8
    assert sum(rewards[-2:]) / 2 > 2 * sum(rewards[:2]) / 2 + 0.01, rewards
    assert module.calculator("12 + 30") == "42" and module.calculator("__import__('os')").startswith("error")
