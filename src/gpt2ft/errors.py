"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, bad data); never shown with a traceback."""

    exit_code = 2


class OptionError(UserError):
    """An option's value refused (alone or beside another option). `say(name_of)` writes the message with each
    option it mentions named by `name_of`, so every surface says its own name for it: the Python API its
    keyword (the message as raised), the CLI its flag, the server its request field. `option` is the one
    refused."""

    def __init__(self, option: str, say: Callable[[Callable[[str], str]], str]):
        super().__init__(say(str))
        self.option, self.say = option, say
