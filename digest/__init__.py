"""digest: each day's trending AI research papers, by email."""

__version__ = "0.1.0"
