"""Driver side: runs in the process that starts Ray (stock ``main_ppo`` or ``dppo-verl-train``)."""
