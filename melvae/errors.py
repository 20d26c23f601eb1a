"""Errors a user can act on: what was wrong, where, and what to do."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input data or configuration. The CLI prints it and exits with code 2."""

    exit_code = 2

    def __init__(self, what: str, *, where: str, fix: str) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(f"{what}\n  where: {where}\n  what to do: {fix}")

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled by its three parts, so that one raised in a worker process (multiprocessing,
        # concurrent.futures, joblib) reaches the caller as itself, not as a TypeError.
        return (_rebuilt, (type(self), self.what, self.where, self.fix))


def _rebuilt(cls: type[InputError], what: str, where: str, fix: str) -> InputError:
    return cls(what, where=where, fix=fix)


class DownloadError(InputError):
    """A named dataset or gene-set library could not be fetched or failed its checksum."""
