"""Frozen settings per command: defaults < config file < flags, validated in one place."""
