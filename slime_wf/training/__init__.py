"""Training: the Megatron-core policy model (built from an HF config), HF<->Megatron weights,
distributed checkpoints, and the RL objectives (`objectives/`)."""
