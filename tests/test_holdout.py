"""The held-out evaluation workflow end to end: plan, baseline, stage 1, cascade, predict imagesTs, compare."""
import json

from nnunetv2_rfmedsam.holdout import HoldoutRecipe, evaluate_holdout
from nnunetv2_rfmedsam.raw_dataset import write_raw_dataset

from conftest import DATASET_NAME


def test_holdout_workflow_trains_both_stages_and_compares_them(nnunet_workspace, hippocampus_cases, tmp_path,
                                                               monkeypatch, recwarn):
    source, train, test = hippocampus_cases
    write_raw_dataset(source, tmp_path / "raw" / DATASET_NAME, train[:3], test[:2])
    env = dict(nnunet_workspace["env"], nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "results"), RFMEDSAM2_ALLOW_RANDOM_INIT="1")
    monkeypatch.setenv("PATH", env["PATH"])
    # fold all: the five folds of the default recipe would train stage 1 five times. Stage 1 is the baseline here
    # (the same training); the commands of the default separate baseline are checked in test_prompt_folds.py.
    recipe = HoldoutRecipe(stage1_budget=(1, 2, 1), stage2_budget=(1, 1, 1), baseline="stage1", stage1_folds="all",
                           stage2_validation_cases=1, sam2_options=["--sam2-image-size", "64"],
                           predict_flags=["--disable_tta", "-step_size", "1"], num_processes=1)
    metrics = evaluate_holdout(4, recipe, env, tmp_path / "out")

    methods = list(metrics["methods"])
    assert methods == ["nnU-Net (nnUNetTrainerRFPrompt)", "RFMedSAM 2 cascade"]
    assert set(metrics["paired"]) == set(methods[1:])
    for name in ("metrics.json", "report.md", "dice_per_class.png", "paired_cases.png", "cases.csv"):
        assert (tmp_path / "out" / "compare" / name).is_file()
    # the held-back images are under the contour figures of the cases to look at
    assert list((tmp_path / "out" / "compare").glob("contours_*.png"))
    assert "without its image" not in "".join(str(w.message) for w in recwarn)
    split = json.loads((tmp_path / "pre" / DATASET_NAME / "splits_final.json").read_text())
    assert len(split[0]["val"]) == 1 and len(split[0]["train"]) == 2
    for trainer in ("nnUNetTrainerRFPrompt", "nnUNetTrainerRFMedSAM2"):
        assert (tmp_path / "out" / "logs" / f"train_{trainer}.log").is_file()
