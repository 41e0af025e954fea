"""Argument checks shared by the layers and models."""


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int ≥ 1 (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
