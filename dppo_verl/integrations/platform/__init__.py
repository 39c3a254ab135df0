"""Platform: CPU-only support, applied only when ``VERL_PLATFORM=cpu`` asks for it. Imports nothing here: vLLM's
plugin entry point loads :mod:`.vllm_cpu` in processes where verl is not imported."""
