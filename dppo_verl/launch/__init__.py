"""The launcher (``dppo-verl-train``, :mod:`.cli`) and the launch rules beside it (:mod:`.rules`,
:mod:`.rollout_rules`), which stock ``main_ppo`` also runs through the driver hook."""
