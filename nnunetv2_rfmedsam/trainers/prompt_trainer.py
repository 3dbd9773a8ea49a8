from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_rfmedsam.budget import EnvironmentBudgetMixin


class nnUNetTrainerBudget(EnvironmentBudgetMixin, nnUNetTrainer):
    """The stock nnUNetTrainer, except that the budget variables apply: the baseline under a reduced budget."""


class nnUNetTrainerRFPrompt(nnUNetTrainerBudget):
    """Stage 1, the prompt UNet: nnU-Net's default training, except that the budget variables apply.

    Its final validation writes the predictions stage 2 trains on: the plans give ``3d_fullres`` the
    ``next_stage`` ``3d_rfmedsam2``, and nnU-Net exports each validation case into
    ``<output>/predicted_next_stage/3d_rfmedsam2/``.
    """
