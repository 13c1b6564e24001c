"""One module per ``flywheel`` subcommand: argument parsing and process wiring only."""
