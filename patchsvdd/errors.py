"""The one base class of every error a user can cause (standard library only).

A bad file, folder or setting raises a subclass of ``InputError`` whose
message names it and says what is wrong; the command line prints those as
one line and exit code 2. Anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from a user (a file, a folder, a setting); the message names it and what is wrong."""
