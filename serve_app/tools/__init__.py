"""Developer tools: nothing in the serving path imports them; they may import anything (MLX included)."""
