"""The one exception type the project raises for bad input, printed as a single line by the CLI."""


class MistralError(Exception):
    """Bad input or an unusable environment: the message names the problem in one line."""
