"""QLoRA fine-tuning of a causal LM on GSM8K as DVC stages: prepare → train → evaluate."""
