"""mixlab's model families, one module per family; importing this registers them all."""
from . import convmixer  # noqa: F401
