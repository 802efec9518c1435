"""symdl's version (the compile cache keys on it)."""
__version__ = "0.3.0"
