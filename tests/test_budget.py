import pytest

from nnunetv2_rfmedsam.budget import read_budget


def test_budget_variables_map_to_trainer_attributes():
    budget = read_budget({"RFMEDSAM2_NUM_EPOCHS": "3", "RFMEDSAM2_ITERS_PER_EPOCH": "5", "RFMEDSAM2_VAL_ITERS": "2"})
    assert budget == {"num_epochs": 3, "num_iterations_per_epoch": 5, "num_val_iterations_per_epoch": 2}


def test_unset_or_empty_variables_keep_the_defaults():
    assert read_budget({"RFMEDSAM2_NUM_EPOCHS": ""}) == {}


@pytest.mark.parametrize("value", ["0", "-2", "ten"])
def test_invalid_budget_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match="RFMEDSAM2_ITERS_PER_EPOCH"):
        read_budget({"RFMEDSAM2_ITERS_PER_EPOCH": value})
