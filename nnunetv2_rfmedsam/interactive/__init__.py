"""Interactive use of a trained refiner: prompts, propagation through the volume, corrections, click simulation."""
from nnunetv2_rfmedsam.interactive.errors import InteractiveError, PromptError
from nnunetv2_rfmedsam.interactive.session import InteractiveSession

__all__ = ["InteractiveError", "InteractiveSession", "PromptError"]
