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


class VersionConflict(PatchsearchError):
    """Another writer installed a version of an index directory after this writer prepared
    its own from an older one (:func:`patchsearch.versions.new_version`); nothing was
    installed, and running the update again starts from the new version."""


class FrameTooLargeError(InputError):
    """A frame's header dimensions exceed the pixel budget (refused before decoding).

    Attributes:
        path: the frame's name (file path or upload name).
        width, height: its dimensions from the header, pixels.
        limit: the budget it exceeds, pixels (width x height).
    """

    def __init__(self, message: str, path: str = "", width: int = 0, height: int = 0, limit: int = 0):
        super().__init__(message)
        self.path, self.width, self.height, self.limit = path, width, height, limit


class UnsupportedFormatError(InputError):
    """A frame is in an image format outside the allow-list (PNG, JPEG, BMP, TIFF, WebP, ...)."""


def check_finite(array, what: str, chunk: int = 65536, first_row: int = 0) -> None:
    """Raise :class:`InputError` naming ``what`` and the first bad row block if ``array``
    (an (N, ...) numpy array or memory map) holds NaN or infinite values. Checked in
    blocks of ``chunk`` rows, so no array-sized temporary is made; ``first_row`` is the
    row number of ``array[0]`` in the caller's numbering (for the message)."""
    import numpy as np

    for start in range(0, len(array), chunk):
        block = np.asarray(array[start:start + chunk])
        if not np.isfinite(block).all():
            a = first_row + start
            raise InputError(f"{what} contain NaN or infinite values (rows {a}..{a + len(block) - 1})")
