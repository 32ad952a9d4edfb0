"""spamray's own errors: what went wrong in the input, the settings or the storage, said so that
the user can act. The CLI prints such an error's message as one line; any other exception is a
bug (or an environment failure, such as CUDA out of memory) and prints its traceback."""


class SpamrayError(Exception):
    """An error spamray names for the user, with what to do."""
