"""The commands: one module per ``jitrelay`` subcommand (``add_arguments`` and ``run``), and what they share."""
