"""Training and prediction for the decoders (BrainMCLIP, ridge)."""
