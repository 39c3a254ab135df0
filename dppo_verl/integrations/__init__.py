"""Integrations with verl, grouped by the process they run in; one small module per verl surface.

- ``actor/`` (the FSDP / Megatron training workers): ``loss_wrapper`` (``ppo_loss``: mu and the Top-K scalars
  handed to the loss), ``engine_flag`` (``BaseEngine.train_batch``: the logits-hook flag and first-use checks),
  ``topk_hook`` (the Top-K divergence on the logits) with ``layout`` (batch rows -> logits rows), ``fused_logprob``
  (the opt-in Triton hand-off of verl's log-probs);
- ``rollout/`` (the vLLM / SGLang rollout servers and agent-loop workers): ``vllm_server`` and ``sglang_server``
  (each with its engine's top-K parser), ``agent_loop`` (top-K into the batch), ``topk_arrays`` (engine-agnostic);
- ``platform/`` (every process, only when ``VERL_PLATFORM=cpu`` asks for it): ``cpu_platform``, ``vllm_cpu``;
- ``driver/`` (the process that calls ``ray.init``): ``ray_runtime_env`` (launch rules on stock ``main_ppo``).

Every runtime patch goes through :mod:`.patching`; :data:`APPLIED` records what ran in this process.
"""

from .patching import APPLIED

__all__ = ["APPLIED"]
