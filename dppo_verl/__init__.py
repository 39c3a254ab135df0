"""dppo_verl: DPPO loss modes for verl 0.9.1.

Importing this package has no side effects (``dppo_verl.ops`` is pure torch and works without verl). The plugin is
installed by :mod:`dppo_verl.plugin`, which verl imports in every process through the ``verl.plugins`` entry point
(and our launcher names in ``external_lib`` / ``VERL_USE_EXTERNAL_MODULES``).

Layout, by the process each part runs in:

- ``ops/``: pure torch (divergences, the Eq. 12 mask, vocab-parallel gathers, Triton kernels);
- ``losses.py``: ops -> verl's policy-loss signature and metrics; ``config.py``: the DPPO knobs, declared once;
  ``contract.py``: every batch key, config path, env var and marker; ``handoff.py``: actor hook -> loss;
- ``integrations/actor/``, ``integrations/rollout/``, ``integrations/platform/``, ``integrations/driver/``: one small
  module per verl surface, all patches through ``integrations/patching.py``;
- ``launch/``: the ``dppo-verl-train`` launcher and the launch rules; ``demo/``: the CPU demo and study.
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["__version__", "loss_modes"]


def loss_modes() -> list[str]:
    """Every registered loss mode: ``<shape>_<divergence>_<estimator>`` (e.g. ``dppo_tv_topk``, ``drpo_kl_binary``)."""
    from .losses import loss_mode_names

    return loss_mode_names()
