"""Errors about data, each naming the file (and row) a person has to look at."""


class DataError(ValueError):
    """Bad or missing data; the message says which file, row or image, and what to do."""


class BadSampleError(DataError):
    """One image or label that cannot be used; `data.on_bad_sample: skip` may skip it."""

    def __init__(self, path, reason: str):
        self.path = path
        self.reason = reason
        # A reason that already starts with the file (e.g. "train.csv:12 (...)") is not prefixed again.
        super().__init__(reason if str(reason).startswith(str(path)) else f"{path}: {reason}")
