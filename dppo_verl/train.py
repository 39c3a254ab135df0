"""``python -m dppo_verl.train`` = ``dppo-verl-train``: the launcher lives in :mod:`dppo_verl.launch.cli`."""

from .launch.cli import compose_config, expand_overrides, main

__all__ = ["compose_config", "expand_overrides", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
