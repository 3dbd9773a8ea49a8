from nnunetv2_rfmedsam.trainers.prompt_trainer import nnUNetTrainerBudget, nnUNetTrainerRFPrompt
from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2

__all__ = ["nnUNetTrainerBudget", "nnUNetTrainerRFPrompt", "nnUNetTrainerRFMedSAM2"]
