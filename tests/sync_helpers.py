"""Shared pieces of the weight-sync tests: tiny engines, greedy outputs, both halves of a group or update."""

from rollout import RolloutEngine, SamplingParams, TransferInitInfo, run_together

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True)
PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 9, [7]]


def engine_for(path, **config):
    return RolloutEngine(model=str(path), device="cpu", num_kv_blocks=96, **config)


def greedy(engine):
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def connect(trainer, engine, timeout_s=20.0, backend="gloo", device=None):
    """Join a new group: the trainer process (its buffers on `device`) and the engine."""
    info = TransferInitInfo.local(backend, timeout_s=timeout_s)
    run_together(lambda: trainer.call("init", device=device, **info.model_dump()),
                 lambda: engine.init_weight_transfer(info))


def sync(trainer, engine, weights, version, pause_mode="wait", engine_info=None, **send):
    """Both halves of one update at once; returns (trainer error or result, engine error or result)."""
    outcome = [None, None]

    def side(i, call):
        def run():
            try:
                outcome[i] = call()
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome[i] = exc
        return run

    run_together(side(0, lambda: trainer.call("send", weights=weights, version=version, **send)),
                 side(1, lambda: engine.update_weights(engine_info, pause_mode=pause_mode)))
    return outcome


def kernel_tensors(engine):
    """The engine's own (kernel-format) parameters, in weight-arena order, copied to the CPU."""
    params = dict(engine.worker.model.named_parameters())
    return {entry.name: params[entry.name].detach().cpu().clone() for entry in engine.worker.pool.weight_layout}
