"""CSM on MLX, the only layer (besides tools) that imports MLX; imports core only."""
