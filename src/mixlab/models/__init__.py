"""mixlab's model families, one module per family; importing this registers them all."""
from . import convmixer  # noqa: F401
from . import convmlp  # noqa: F401
from . import conv2former  # noqa: F401
from . import unext  # noqa: F401
from . import asmlp  # noqa: F401
from . import swin_mlp  # noqa: F401
from . import baselines  # noqa: F401
from . import mlp_baselines  # noqa: F401
