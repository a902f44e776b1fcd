"""Training: state, jitted step, checkpoints, metrics, the loop."""
