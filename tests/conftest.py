import os
import sys

# The suite runs verl on this CPU, so it asks for dppo_verl's CPU platform the way a user does (nothing selects it
# otherwise). Set before anything imports verl; subprocesses inherit it (do-no-harm tests remove it on purpose).
os.environ.setdefault("VERL_PLATFORM", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `import reference`


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    from dppo_verl.handoff import take_hook_checks

    take_hook_checks()  # a test that ran the Top-K hook without its loss leaves its queued checks: not the next's


def make_actor_config(policy_loss=None, **overrides):
    """A real verl ActorConfig, as verl's own policy-loss tests build it."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    kw = dict(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode="token-mean",
        policy_loss=policy_loss if policy_loss is not None else PolicyLossConfig(loss_mode="dppo_tv_binary"),
    )
    kw.update(overrides)
    return ActorConfig(**kw)
