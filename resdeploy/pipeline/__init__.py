"""The only place that chains the stages: the CLI, the run, the workbench (what gets compared), parity and its gates,
bench and the machine probe, engine choice, the model repository and the reports."""
