"""The steering loop: steps, the policy's decisions, hold-back and release, and output processing."""
