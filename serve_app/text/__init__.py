"""Text rules (chunking, markdown) and the text frontend deployment, which resolves voices first.

Imports core and voices.
"""
