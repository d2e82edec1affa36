from . import _schema  # noqa: F401
