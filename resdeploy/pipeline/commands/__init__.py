"""One module per subcommand; see resdeploy.pipeline.cli."""
