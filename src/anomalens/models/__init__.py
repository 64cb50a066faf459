"""Importing this package registers every model. One import line per model file."""
from . import padim  # noqa: F401
from . import patchcore  # noqa: F401
from . import stfpm  # noqa: F401
