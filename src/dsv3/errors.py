"""User-facing errors: one clear line, exit code 2, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt shard).

    The CLI prints ``str(err)`` as a single line and exits with code 2.
    """
