"""The one error every command raises for a command line it cannot carry out."""


class UsageError(Exception):
    """A command line that parses but asks for something impossible; the command exits 2."""
