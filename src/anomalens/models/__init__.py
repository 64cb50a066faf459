"""Importing this package registers every model. One import line per model file."""
from . import padim  # noqa: F401
from . import patchcore  # noqa: F401
from . import stfpm  # noqa: F401
from . import reverse_distillation  # noqa: F401
from . import dfm  # noqa: F401
from . import efficient_ad  # noqa: F401
from . import dfkde  # noqa: F401
from . import draem  # noqa: F401
from . import fastflow  # noqa: F401
from . import cflow  # noqa: F401
from . import autoencoder  # noqa: F401
from . import ganomaly  # noqa: F401
