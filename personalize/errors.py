"""The one exception type that means "the user asked for something invalid"."""


class UserError(ValueError):
    """Bad input from a user: the message names what was wrong and what is accepted.

    The command line prints it as one line and exits with status 2; the app shows it
    in the page. Anything else that escapes is a bug.
    """
