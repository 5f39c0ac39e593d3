"""What training shares across models: the epoch loop and checkpoints."""
