"""Environments an agent acts in, as text: the protocol (`base.TextEnv`) and adapters for real environment
packages (each behind an optional extra)."""
