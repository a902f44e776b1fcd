"""Errors raised on bad corpus input, each naming where and what was expected."""

from __future__ import annotations


class DataError(ValueError):
    """A bad input record or file.

    The message always reads ``<file>:<line or record>: <what> (expected <what>)``
    so a failed build points at the exact place to fix. ``location`` and
    ``reason`` are kept as attributes for ``--skip_bad_records`` reporting.
    """

    def __init__(self, path: str, where: str | int | None, reason: str):
        self.path = str(path)
        self.where = where
        self.reason = reason
        loc = self.path if where is None else f"{self.path}:{where}"
        super().__init__(f"{loc}: {reason}")

    def __reduce__(self):  # picklable across Beam / grain worker processes
        return (DataError, (self.path, self.where, self.reason))


_MARKER = "cbm_lm.data.errors.DataError: "


def unwrap(exc: BaseException) -> DataError | None:
    """The DataError inside an exception a Beam runner wrapped, if any.

    Runners re-raise worker errors as RuntimeError('<type>: <message>
    [while running ...]'); this recovers the message so callers see the
    same ``file:line: reason`` text whatever the runner.
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, DataError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if _MARKER not in text:
        return None
    msg = text.split(_MARKER, 1)[1].split(" [while running", 1)[0].strip()
    err = DataError("", None, msg)
    err.args = (msg,)
    return err
