"""Errors about data, each naming the file (and row) a person has to look at."""


class DataError(ValueError):
    """Bad or missing data; the message says which file, row or image, and what to do."""


class BadSampleError(DataError):
    """One image or label that cannot be used; `data.on_bad_sample: skip` may skip it."""

    def __init__(self, path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
