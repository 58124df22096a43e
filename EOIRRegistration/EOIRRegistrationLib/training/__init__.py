"""Training: synthetic and file-based pair sources, objectives, and the training loop."""
