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
    """An image file or record could not be decoded."""
