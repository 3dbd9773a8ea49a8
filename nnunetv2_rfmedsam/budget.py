"""Training budget from environment variables, for CPU users, demos and tests.

``RFMEDSAM2_NUM_EPOCHS``, ``RFMEDSAM2_ITERS_PER_EPOCH`` and ``RFMEDSAM2_VAL_ITERS`` override the
trainer's epochs, training iterations per epoch and validation iterations per epoch.
"""
import os

import torch

BUDGET_VARIABLES = {
    "RFMEDSAM2_NUM_EPOCHS": "num_epochs",
    "RFMEDSAM2_ITERS_PER_EPOCH": "num_iterations_per_epoch",
    "RFMEDSAM2_VAL_ITERS": "num_val_iterations_per_epoch",
}


def read_budget(environ=os.environ) -> dict:
    """Return {trainer attribute: value} for every budget variable that is set."""
    budget = {}
    for variable, attribute in BUDGET_VARIABLES.items():
        raw = environ.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 1:
            raise ValueError(f"{variable}={raw!r} is not allowed; use a positive integer")
        budget[attribute] = value
    return budget


class EnvironmentBudgetMixin:
    """Put before an nnUNetTrainer in the bases: the budget variables override its defaults."""

    # nnU-Net saves this signature's arguments in checkpoints (init_args) by introspection: keep it explicit
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, value in read_budget().items():
            setattr(self, attribute, value)
            variable = next(k for k, v in BUDGET_VARIABLES.items() if v == attribute)
            self.print_to_log_file(f"Training budget from {variable}: {attribute} = {value}")
