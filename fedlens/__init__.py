"""fedlens: privacy-preserving federated explanations."""

__version__ = "0.1.0"

__all__ = ["__version__"]
