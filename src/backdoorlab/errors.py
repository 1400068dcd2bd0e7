"""The one exception type for problems with what the user handed us."""


class BadInput(Exception):
    """A file, option or value the user supplied is unusable.

    The CLI prints ``error: <message>`` on one line and exits with status 2. The message
    should name what is wrong, where, and what was expected.
    """
