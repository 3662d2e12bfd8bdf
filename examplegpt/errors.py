"""The one exception type that the CLI turns into a single line on stderr."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a corpus): reported as one line, exit status 1.

    Anything else that escapes is a bug in ExampleGPT and keeps its traceback.
    """
