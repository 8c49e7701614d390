"""Shared by every layer: settings, constants, errors, what crosses a handle, logs, metrics, processes.

Imports no other layer.
"""
