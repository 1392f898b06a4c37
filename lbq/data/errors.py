"""Errors raised by ``lbq.data``: each names the problem in one line."""

from __future__ import annotations


class DataError(ValueError):
    """Base class: a data config, dataset or input file that cannot be used."""


class UnknownDatasetError(DataError):
    """The dataset name is neither 'digits', a TFDS dataset nor a prepared dataset."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The data directory is missing or the dataset was not prepared in it."""


class FolderLayoutError(DataError, FileNotFoundError):
    """An image folder does not have the ROOT/<split>/<class>/<image> layout."""


class ImageReadError(DataError):
    """An image file or record could not be decoded, or its mode has no defined 8-bit RGB form.

    Attributes:
      reason: the cause alone, without the file or record name (for lists of skipped files).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message
