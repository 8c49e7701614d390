"""The HTTP ingress deployment and its dialects: the only layer that imports FastAPI.

Imports every layer but engine and tools.
"""
