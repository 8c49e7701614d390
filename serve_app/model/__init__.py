"""The model deployment: the engine on its one MLX thread, its lifecycle and its health registry.

Imports core, voices and engine.
"""
