"""One module per ``adaptive-pin`` subcommand; each exposes ``register(subparsers)``."""
