"""CLI subcommands; each module exposes ``register(subparsers)`` (see `nbdbackup.cli`)."""
