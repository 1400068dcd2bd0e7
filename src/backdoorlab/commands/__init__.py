"""CLI commands. Every module here defines ``register(subparsers)``; `backdoorlab.cli` finds
them all, so adding a command never touches a shared file."""
