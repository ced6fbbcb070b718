"""One error hierarchy. Every message says what is wrong and how to fix it.

The CLI prints ``error: <message>`` for any :class:`SteerscopeError` (and for file errors:
``OSError``, ``UnicodeError``) and exits with code 2, without a traceback; anything else is a bug:
it too is one ``error: internal error ...`` line, exit 1, and ``steerscope --debug`` shows its traceback.
"""

from __future__ import annotations


class SteerscopeError(Exception):
    """Base class for user-facing errors (bad input, incompatible files, missing extras)."""


class UnsupportedModelError(SteerscopeError):
    """The model's architecture has no adapter table."""


class ModelLoadError(SteerscopeError):
    """A model name, path or file could not be loaded."""


class SiteError(SteerscopeError):
    """A site name, layer or head index is invalid for this model."""


class VectorError(SteerscopeError):
    """A steering vector is malformed, corrupt, or made for another model."""


class DataError(SteerscopeError):
    """Prompt data is missing, empty or malformed."""


class StudyError(SteerscopeError):
    """A study run folder or configuration is inconsistent."""


class ClassifierError(SteerscopeError):
    """A text classifier is missing its package or data."""


class SAEError(SteerscopeError):
    """Bad input to the sparse autoencoder."""


class BackendError(SteerscopeError):
    """An engine cannot run these requests (its environment is missing, it refused or failed a request,
    or the requests ask for something it does not do)."""


class ConditionError(SteerscopeError):
    """A steering condition (gate) or clamp range is malformed, or does not fit the model."""


class ArgError(SteerscopeError):
    """A command-line argument is invalid."""


class FingerprintWarning(UserWarning):
    """A vector was made on a model with other weights than the one it is applied to."""


class RecommendedAlpha(UserWarning):
    """``steering`` was called without an alpha and uses the one the vector's ``use`` record recommends."""
