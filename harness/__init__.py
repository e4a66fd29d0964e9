"""The experiment harness behind train.py: config schema, methods, metrics, checkpoints, DDP."""
