"""The errors of interactive use: each message is one line that names the file, option or prompt."""


class InteractiveError(ValueError):
    """A model folder, image or request the session cannot use."""


class PromptError(InteractiveError):
    """A prompt that cannot be used, e.g.
    "prompt 3 (class 1, slice 12): point (70, 5) is outside the image of size 64 x 48"."""
