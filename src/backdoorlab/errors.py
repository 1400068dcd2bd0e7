"""The one exception type for problems with what the user handed us."""


class BadInput(Exception):
    """A file, option or value the user supplied is unusable.

    The CLI prints ``error: <message>`` on one line and exits with status 2. The message
    should name what is wrong, where, and what was expected.
    """


class MissingSplit(BadInput):
    """The data set has no files for the split asked for (readers raise it so that a caller that
    did not choose the split, like ``data info``, can show the split that is there)."""
