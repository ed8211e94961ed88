"""Runners of the ``attnscope`` subcommands: one module per subcommand, each with
``run(args) -> exit code``; ``attnscope.cli`` imports a module only when its subcommand runs.
This is the only layer that wires analyses to files and flags (shared flag syntax: ``common``)."""
