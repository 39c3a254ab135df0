"""``dppo-verl-train``: verl 0.9.1's ``main_ppo`` with DPPO shorthands, validation before Ray, and a dry run.

    dppo-verl-train <any verl override> ... actor.policy_loss=dppo_tv_topk [--dry-run]

Every verl override passes through unchanged. The shorthand ``actor.policy_loss=<mode>`` (or
``actor_rollout_ref.actor.policy_loss=<mode>``) expands into one consistent config (printed once):

- ``actor_rollout_ref.actor.policy_loss.loss_mode=<mode>`` and our ``DPPOPolicyLossConfig`` as ``_target_``;
- DPPO knobs given as ``actor_rollout_ref.actor.policy_loss.<knob>=v`` (or ``actor.policy_loss.<knob>=v``) get
  the ``+`` Hydra needs for keys that verl's YAML does not have;
- the anchor: ``actor_rollout_ref.rollout.calculate_log_probs=True`` (mu = the rollout's log-probs);
- Top-K modes: the rollout request ``+actor_rollout_ref.rollout.custom.dppo_num_topk=K`` (K = ``num_topk``);
- the plugin in every process: ``actor_rollout_ref.model.external_lib=dppo_verl.plugin`` and, for Ray workers on
  other nodes, ``VERL_USE_EXTERNAL_MODULES=dppo_verl.plugin`` in the Ray runtime environment (the entry point covers
  every node where the package is installed; these make a missing install fail loudly instead of silently), plus
  the driver's version (``DPPO_VERL_DRIVER_VERSION``), which every node compares with its own;
- ``trainer.device=cpu`` (any loss mode) asks for dppo_verl's CPU platform: ``VERL_PLATFORM=cpu`` here and in the
  Ray runtime environment. Nothing else ever selects it.

Then the composed config is checked by :func:`dppo_verl.launch.rules.check_config` (the same rules the driver hook
of stock ``main_ppo`` and, for what they can see, the workers enforce) before any Ray worker starts, and verl's own
``main_ppo`` runs it.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .. import __version__
from ..contract import (
    CALCULATE_LOG_PROBS, CONFIG_TARGET, CPU_PLATFORM, DEFAULT_NUM_TOPK, ENV_DRIVER_VERSION, ENV_EXTERNAL_MODULES,
    ENV_PLATFORM, EXTERNAL_LIB, LOSS_MODE, PLUGIN_MODULE, POLICY_LOSS, RAY_ENV_VARS, ROLLOUT, ROLLOUT_NUM_TOPK,
    SAMPLED_IDS_KNOB,
)

__all__ = ["expand_overrides", "compose_config", "main"]

SHORTHANDS = ("actor.policy_loss", POLICY_LOSS)
PL = POLICY_LOSS
HYDRA_FLAGS = ("--config-path", "--config-name", "--config-dir", "-cp", "-cn", "-cd")


def _split(arg: str) -> tuple[str, str, Optional[str]]:
    """``'+a.b=c'`` -> ``('+', 'a.b', 'c')``; value None for flags without '='."""
    prefix = ""
    while arg[:1] in ("+", "~"):
        prefix, arg = prefix + arg[0], arg[1:]
    key, eq, value = arg.partition("=")
    return prefix, key, value if eq else None


def expand_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expand the DPPO shorthands. Returns ``(verl overrides, human-readable expansion lines)``."""
    from ..knobs import DEFAULTS, parse_loss_mode

    knobs = tuple(DEFAULTS)  # every DPPO knob, so a new one never needs a second list here

    out, notes, mode, k = [], [], None, None
    for arg in overrides:
        prefix, key, value = _split(arg)
        if key.startswith("actor.policy_loss."):  # short form of a knob
            key = "actor_rollout_ref." + key
        if key in SHORTHANDS and value is not None and "{" not in value:
            if parse_loss_mode(value) is None:
                from .. import loss_modes

                raise SystemExit(f"dppo-verl-train: {arg!r}: unknown DPPO loss mode; valid: {loss_modes()}")
            mode = value
            continue
        if key.startswith(PL + ".") and key[len(PL) + 1 :] in knobs:
            prefix = prefix or "+"  # verl's YAML has no such key
            if key.endswith(".num_topk"):
                k = int(value)
        out.append(f"{prefix}{key}={value}" if value is not None else prefix + key)
    if mode is None:
        return out, notes
    added = [
        f"{LOSS_MODE}={mode}",
        f"{PL}._target_={CONFIG_TARGET}",
        f"{CALCULATE_LOG_PROBS}=True",
        f"{EXTERNAL_LIB}={PLUGIN_MODULE}",
        f"+{RAY_ENV_VARS}.{ENV_EXTERNAL_MODULES}={PLUGIN_MODULE}",
        f"+{RAY_ENV_VARS}.{ENV_DRIVER_VERSION}={__version__}",
    ]
    if parse_loss_mode(mode).is_topk:
        added.append(f"+{ROLLOUT_NUM_TOPK}={k if k is not None else DEFAULT_NUM_TOPK}")
    explicit = {_split(a)[1] for a in out}
    added = [a for a in added if _split(a)[1] not in explicit]  # the user's own value wins
    notes = [f"{a}" for a in added]
    return added + out, notes


def _hydra_args(argv: Sequence[str]) -> tuple[list[str], dict, bool]:
    """Split argv into overrides, Hydra's config flags and our ``--dry-run``."""
    overrides, flags, dry_run, it = [], {}, False, iter(argv)
    for arg in it:
        if arg == "--dry-run":
            dry_run = True
        elif arg.split("=", 1)[0] in HYDRA_FLAGS:
            name, _, val = arg.partition("=")
            flags[name] = val if val else next(it)
        else:
            overrides.append(arg)
    return overrides, flags, dry_run


def _string_shorthand_in_yaml(config_dir: Optional[str], name: str) -> tuple[Optional[str], Optional[str]]:
    """A user YAML may say ``actor_rollout_ref.actor.policy_loss: dppo_tv_topk`` (a string where verl has a node).

    Returns ``(mode, patched_config_dir)``: a copy of the YAML without that string, in a new directory whose
    Hydra search path starts with the original directory (so its defaults still resolve), or ``(None, None)``.
    """
    import os
    import tempfile

    from omegaconf import OmegaConf

    if not config_dir:
        return None, None
    path = os.path.join(os.path.abspath(config_dir), name if name.endswith(".yaml") else name + ".yaml")
    if not os.path.isfile(path):
        return None, None
    raw = OmegaConf.load(path)
    for key in SHORTHANDS:
        value = OmegaConf.select(raw, key)
        if isinstance(value, str):
            parent, _, leaf = key.rpartition(".")
            del OmegaConf.select(raw, parent)[leaf]
            search = list(OmegaConf.select(raw, "hydra.searchpath") or [])
            OmegaConf.update(raw, "hydra.searchpath", ["file://" + os.path.dirname(path)] + search, merge=False)
            out_dir = tempfile.mkdtemp(prefix="dppo_verl_cfg_")  # kept: verl's Hydra main reads it later
            OmegaConf.save(raw, os.path.join(out_dir, os.path.basename(path)))
            return value, out_dir
    return None, None


def compose_config(overrides: Sequence[str], config_name: str = "ppo_trainer", config_dir: Optional[str] = None):
    """Compose the verl config exactly as ``main_ppo`` would (verl's config dir unless another is given)."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    config_dir = config_dir or os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def _cpu_requested(overrides: Sequence[str]) -> list[str]:
    """``trainer.device=cpu`` asks for the CPU platform: set it here (before verl is imported) and in every Ray
    worker; returns the override that forwards it (none when not asked)."""
    import os

    if not any(_split(a)[1:] == ("trainer.device", CPU_PLATFORM) for a in overrides):
        return []
    os.environ[ENV_PLATFORM] = CPU_PLATFORM
    return [f"+{RAY_ENV_VARS}.{ENV_PLATFORM}={CPU_PLATFORM}"]


BYPASS = "algorithm.rollout_correction.bypass_mode"


def _skip_pi_old(cfg, explicit: set) -> list[str]:
    """A DPPO mode anchored on the rollout never reads verl's recomputed pi_old: skip that forward pass over the batch
    with verl's own V1 bypass (``old_log_probs := rollout_log_probs``). Not for ``anchor=old`` (it reads pi_old), not
    for the legacy trainer (its bypass replaces the loss), and never over the user's own value (the opt-out:
    ``algorithm.rollout_correction.bypass_mode=False``)."""
    from omegaconf import OmegaConf

    from ..knobs import parse_loss_mode, resolve_knobs

    mode = OmegaConf.select(cfg, LOSS_MODE)
    if parse_loss_mode(mode) is None or BYPASS in explicit or OmegaConf.select(cfg, "trainer.use_v1") is False:
        return []
    if resolve_knobs(mode, OmegaConf.select(cfg, POLICY_LOSS)).anchor != "rollout":
        return []
    return [f"{BYPASS}=True"]


def _sampled_ids_for_rollout(cfg, explicit: set) -> list[str]:
    """verl 0.9.1's SGLang server samples from every head row (its vLLM server masks the rows past the tokenizer):
    normalise pi over every row too (``policy_loss.sampled_ids=all``), unless the user set the knob."""
    from omegaconf import OmegaConf

    from ..knobs import parse_loss_mode

    if (parse_loss_mode(OmegaConf.select(cfg, LOSS_MODE)) is None or SAMPLED_IDS_KNOB in explicit
            or OmegaConf.select(cfg, f"{ROLLOUT}.name") != "sglang"):
        return []
    return [f"+{SAMPLED_IDS_KNOB}=all"]  # verl's YAML has no such key


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, flags, dry_run = _hydra_args(argv)
    cpu = _cpu_requested(overrides)
    import dppo_verl.plugin  # noqa: F401  (the driver's modes; workers load it via entry point / external_lib)
    from omegaconf import OmegaConf

    from .rules import check_config

    name = flags.get("--config-name", flags.get("-cn", "ppo_trainer"))
    cdir_key = next((k for k in ("--config-path", "-cp", "--config-dir", "-cd") if k in flags), None)
    cdir = flags.get(cdir_key) if cdir_key else None
    yaml_mode, patched_dir = _string_shorthand_in_yaml(cdir, name)
    if yaml_mode is not None:  # the YAML's string goes first: command-line overrides still win
        overrides = [f"actor.policy_loss={yaml_mode}"] + overrides
        cdir = flags[cdir_key] = patched_dir
    expanded, notes = expand_overrides(overrides)
    explicit = {_split(a)[1] for a in expanded}
    cpu = [a for a in cpu if _split(a)[1] not in explicit]
    expanded, notes = expanded + cpu, notes + cpu
    cfg = compose_config(expanded, config_name=name, config_dir=cdir)
    skip = _skip_pi_old(cfg, explicit) + _sampled_ids_for_rollout(cfg, explicit)
    if skip:
        expanded, notes = expanded + skip, notes + skip
        cfg = compose_config(expanded, config_name=name, config_dir=cdir)
    if notes:
        print("dppo-verl-train: expanded the DPPO shorthand into:\n  " + "\n  ".join(notes), flush=True)
    try:
        check_config(cfg)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=False))
        print("dppo-verl-train: dry run: configuration resolved and validated; not starting Ray.", flush=True)
        return 0
    from verl.trainer import main_ppo

    hydra_argv = [f"{k}={v}" for k, v in flags.items()]
    sys.argv = [sys.argv[0]] + hydra_argv + expanded
    main_ppo.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
