"""corrpo: study and exploit the entropy-gradient inversion of reasoning language models."""

__version__ = "0.1.0"
