"""Training: configs and recipes, the training loop, checkpoints and run directories."""
