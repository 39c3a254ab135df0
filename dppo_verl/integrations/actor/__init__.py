"""Actor side: runs in verl's training workers (FSDP or Megatron engine). See :mod:`dppo_verl.integrations`."""
