"""Sesame TTS: an OpenAI-compatible text-to-speech server for Sesame CSM-1B on MLX, as a Ray Serve app."""
