"""The one exception type for mistakes a user can fix (bad config, missing data, ...).

Command-line entry points catch `UserError` and print its message alone, without a traceback:
the message must name the cause and, where one exists, the fix.
"""


class UserError(ValueError):
    """A problem with the user's input (config, files, workdir) rather than a bug."""
