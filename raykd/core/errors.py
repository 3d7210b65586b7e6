"""The one exception type raykd shows to users without a traceback."""


class RaykdError(Exception):
    """A problem the user can fix (bad config, bad input file, missing stage output).

    The CLI prints the message alone and exits with status 1; `--debug` shows the traceback.
    """
