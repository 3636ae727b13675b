"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix: the message names what is wrong and how to fix it."""
