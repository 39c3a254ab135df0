"""The CPU demo: a tiny model, a verifiable task, a warm start and progress/plots for verl's real PPO trainer.

Nothing here launches verl. ``assets`` builds the tokenizer, model and parquet files (``build_all``),
``reward`` is the rule-based reward verl loads (``reward.custom_reward_function.path=pkg://dppo_verl.demo.reward``),
``warmstart`` gives the random model a head start with plain-torch supervised steps, and ``report`` turns
verl's ``file`` logger output into progress lines and PNG plots.
"""
