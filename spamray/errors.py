"""spamray's own errors: what went wrong in the input, the settings or the storage, said so that
the user can act. The CLI prints such an error's message as one line; any other exception is a
bug (or an environment failure, such as CUDA out of memory) and prints its traceback."""


from collections.abc import Iterator
from contextlib import contextmanager


class SpamrayError(Exception):
    """An error spamray names for the user, with what to do."""


class StoreFailed(SpamrayError, RuntimeError):
    """A request to the storage failed (past its client's retries) before anything was committed."""


# Errors that say what is wrong in the user's own words (a file that is not there, a setting).
USER_ERRORS = (SpamrayError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


@contextmanager
def store_step(step: str) -> Iterator[None]:
    """A step that reads or writes storage before a run commits anything: an error of the user's
    own goes through as it is; any other (a store that errors, stalls or cuts the connection past
    its client's retries) becomes a StoreFailed that names the step and what the next run does."""
    try:
        yield
    except USER_ERRORS:
        raise
    except Exception as error:
        raise StoreFailed(f"{step} failed ({type(error).__name__}: {last_line(error)}); nothing of this run was "
                          "committed, and the next run tries again") from error


def last_line(error: BaseException) -> str:
    """The last line of an error's text: for Ray's errors, the root cause ("SomeError: why");
    the error's type where it has no text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
