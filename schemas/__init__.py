"""Data contracts: Arrow table schemas, the pipeline config, the manifest, LLM output schemas."""
