from nnunetv2_rfmedsam.trainers.prompt_trainer import nnUNetTrainerRFPrompt

__all__ = ["nnUNetTrainerRFPrompt"]
