"""`rollout serve` over the Ray executor (two replicas): completions and /generate equal a synchronous engine's,
and the control routes fan out."""

import httpx
import pytest

from rollout import AsyncRolloutEngine, RolloutEngine, SamplingParams
from serve_helpers import LiveServer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("local_ray")
CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=16, max_num_batched_tokens=256, seed=3)
PROMPTS = [[5, 17, 99, 200], [44, 8, 301], [9, 9, 9, 9, 9]]


def test_ray_executor_behind_the_server(text_checkpoint):
    params = SamplingParams(max_tokens=6, seed=2, ignore_eos=True, logprobs=True)
    reference = RolloutEngine(model=str(text_checkpoint), **CONFIG)
    want = [o.samples[0].token_ids for o in reference.generate(PROMPTS + ["hello"], params)]
    reference.shutdown()
    live = LiveServer(AsyncRolloutEngine(model=str(text_checkpoint), executor="ray", data_parallel_size=2, **CONFIG))
    try:
        body = {"prompt": PROMPTS + ["hello"], "max_tokens": 6, "seed": 2, "ignore_eos": True, "logprobs": 0,
                "return_token_ids": True}
        got = httpx.post(f"{live.url}/v1/completions", json=body, timeout=120).json()
        assert [c["token_ids"] for c in got["choices"]] == want
        r = httpx.post(f"{live.url}/generate", json={"input_ids": PROMPTS[0], "sampling_params": params.model_dump()},
                       timeout=120)
        assert r.json()["output_ids"] == want[0]
        for path, body in (("/pause_generation", {"mode": "keep"}), ("/resume_generation", {})):
            assert httpx.post(f"{live.url}{path}", json=body, timeout=120).status_code == 200
        assert httpx.get(f"{live.url}/weight_version").json() == {"weight_version": 0}
    finally:
        live.stop()
