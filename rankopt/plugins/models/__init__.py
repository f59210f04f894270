"""Built-in model architectures, one module per family."""

__all__ = ["BUILTIN"]

BUILTIN: tuple[str, ...] = ()
