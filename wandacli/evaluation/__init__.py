"""The model under test, attack prompts and judges, generation backends, utility."""
