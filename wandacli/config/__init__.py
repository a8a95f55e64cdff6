"""Settings per command: frozen dataclasses whose fields are options, each declared once
(declare.py: flag, help, panel, rule, part of the request or not), from which the command
line, the TOML keys and the request fingerprint are made.

Precedence: built-in defaults < config file (`--config FILE.toml`) < flags on the command line.
A config file is TOML (read by the standard library's tomllib, no extra dependency): top-level
keys apply to every command, a table named after a command (`[score]`, `[prune]`, ...) applies
to that command only and wins over the top level. Keys are option names with dashes or
underscores (`nsamples`, `sparsity-ratio`); `[pipeline]` is the study's plan, not a command's
defaults.
"""
