"""One module per ``mixlab`` subcommand: each has ``configure(parser)`` and ``run(args) -> int``."""
