"""Exceptions raised by patchsearch.

Every error a user can cause (bad image, wrong folder, damaged index, impossible
option) is a :class:`PatchsearchError`; the CLI prints its message on one line and
exits non-zero. Anything else is a bug and keeps its traceback.
"""


class PatchsearchError(Exception):
    """Base class of all user-facing patchsearch errors."""


class InputError(PatchsearchError, ValueError):
    """An input file, folder, array or option is unusable (the message names it)."""


class WeightsUnavailableError(PatchsearchError):
    """Pretrained backbone weights are not on this machine and cannot be downloaded."""


class IndexFormatError(PatchsearchError):
    """An index directory is missing, damaged, of another format version or
    incompatible with what was asked (other backbone, other embedding dimension)."""
