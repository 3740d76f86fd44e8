"""Build a tiny random checkpoint, generate with logprobs, then load new weights and generate again.

    python examples/quickstart.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from rollout import RolloutEngine, SamplingParams
from rollout.demo import quiet_transformers


CONFIG = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
                     eos_token_id=1, tie_word_embeddings=True)


def random_model(seed: int) -> AutoModelForCausalLM:
    """A random model with weights large enough to give peaked (non-uniform) next-token distributions."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def main() -> None:
    with tempfile.TemporaryDirectory() as path:
        with quiet_transformers():  # no "Writing model shards" bar
            random_model(seed=0).save_pretrained(path)
        engine = RolloutEngine(model=path, device="cpu")
        params = SamplingParams(n=2, temperature=1.0, max_tokens=8, logprobs=True, seed=1)
        for out in engine.generate([[10, 11, 12], [40, 41]], params):
            for sample in out.samples:
                print(out.request_id, sample.token_ids, [round(x, 3) for x in sample.logprobs], sample.finish_reason)
        trainer = random_model(seed=1)
        version = engine.load_weights(trainer.state_dict().items())
        out = engine.generate([[10, 11, 12]], params)[0]
        print(f"after update to version {version}:", out.samples[0].token_ids, out.samples[0].weight_version)


if __name__ == "__main__":
    main()
