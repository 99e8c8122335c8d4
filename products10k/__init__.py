"""products10k: a DVC pipeline for SKU-level product recognition on Products-10K.

Modules are named for what they hold; stage scripts under ``stages/`` are thin wrappers
that parse paths from the command line, load their typed params and call in here.
"""

__version__ = "0.1.0"
