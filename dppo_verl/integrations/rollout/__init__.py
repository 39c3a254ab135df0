"""Rollout side: runs in verl's rollout servers (vLLM, SGLang) and agent-loop workers. See :mod:`dppo_verl.integrations`."""
