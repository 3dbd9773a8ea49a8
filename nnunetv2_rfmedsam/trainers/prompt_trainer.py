"""Stage 1: nnU-Net's default training, keeping track of which fold wrote stage 2's training prompts."""
from __future__ import annotations

from os.path import join

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_rfmedsam import cascade_inputs
from nnunetv2_rfmedsam.budget import EnvironmentBudgetMixin
from nnunetv2_rfmedsam.dataset_support import SupportedDatasetMixin
from nnunetv2_rfmedsam.trainers.atomic_checkpoints import AtomicCheckpointMixin
from nnunetv2_rfmedsam.trainers.prompt_folds import (PROMPT_FOLDS_MANIFEST, OutOfFoldPromptsWouldBeOverwritten,
                                                     check_prompt_overwrite, forget_prompt_folds,
                                                     record_prompt_folds)


class nnUNetTrainerBudget(EnvironmentBudgetMixin, nnUNetTrainer):
    """The stock nnUNetTrainer, except that the budget variables apply: the baseline under a reduced budget."""


class nnUNetTrainerRFPrompt(AtomicCheckpointMixin, SupportedDatasetMixin, nnUNetTrainerBudget):
    """Stage 1, the prompt UNet: nnU-Net's default training, except that the budget variables apply, and that it
    keeps track of which fold wrote stage 2's training prompts, and that it refuses datasets stage 2 cannot refine
    (dataset_support.py) before any time is spent, and that its checkpoints replace their files atomically.

    Its final validation writes the predictions stage 2 trains on: the plans give ``3d_fullres`` the
    ``next_stage`` ``3d_rfmedsam2``, and nnU-Net exports each validation case into
    ``<output>/predicted_next_stage/3d_rfmedsam2/``, one folder for all folds. After that validation the
    manifest ``rfmedsam_prompt_folds.json`` there records each case's fold (written atomically).

    Fold ``all`` REFUSES to write over out-of-fold predictions (manifest entries from folds 0-4), both when
    training starts (before any time is spent) and when its final validation starts (``--val``, or folds finishing
    in parallel): it stops with an error naming the folder. ``RFMEDSAM2_OVERWRITE_OOF_PROMPTS=1`` lets it replace
    them, with a WARNING in the log and on stdout.

    nnU-Net's predictor, which builds its network here, checks the images before predicting any case
    (cascade_inputs.py): one file per channel, whole, finite.
    """

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        cascade_inputs.install()
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def next_stage_folders(self) -> list[str]:
        names = self.configuration_manager.next_stage_names or []
        if self.output_folder_base is None:
            return []
        return [join(self.output_folder_base, "predicted_next_stage", name) for name in names]

    def check_next_stage_overwrite(self) -> None:
        if self.fold != "all" or not self.next_stage_folders():
            return
        _, validation_cases = self.do_split()
        for folder in self.next_stage_folders():
            try:
                warning = check_prompt_overwrite(folder, self.fold, validation_cases)
            except OutOfFoldPromptsWouldBeOverwritten as error:
                self.print_to_log_file(str(error))
                raise
            if warning:
                self.print_to_log_file(warning)

    def on_train_start(self):
        self.check_next_stage_overwrite()
        super().on_train_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.check_next_stage_overwrite()
        training_cases, validation_cases = self.do_split()
        folders = self.next_stage_folders() if self.local_rank == 0 else []
        for folder in folders:
            forget_prompt_folds(folder, validation_cases)
        super().perform_actual_validation(save_probabilities)
        for folder in folders:
            record_prompt_folds(folder, self.fold, validation_cases, training_cases)
            self.print_to_log_file(f"Stage-1 fold {self.fold} recorded its next-stage predictions in "
                                   f"{join(folder, PROMPT_FOLDS_MANIFEST)}")
