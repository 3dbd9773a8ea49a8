"""Stage 1 through the stock nnU-Net commands, end to end on real hippocampus cases (tiny budget)."""
import json
import re
import shutil

import numpy as np
import torch

from conftest import DATASET_NAME, STAGE1_FOLDER, assert_same_geometry, bin_command, run_command


def test_final_validation_writes_next_stage_predictions_for_every_training_case(stage1_workspace):
    folder = stage1_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "predicted_next_stage" / "3d_rfmedsam2"
    written = sorted(p.name.split(".")[0] for p in folder.iterdir() if p.suffix == ".b2nd")
    assert written == sorted(stage1_workspace["train"])


def test_budget_variables_are_logged(stage1_workspace):
    logs = list((stage1_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "fold_all").glob("training_log*"))
    text = "".join(p.read_text() for p in logs)
    assert "RFMEDSAM2_ITERS_PER_EPOCH: num_iterations_per_epoch = 2" in text


def test_stock_predict_keeps_geometry_and_evaluate_folder_runs(stage1_workspace, stage1_test_predictions, tmp_path):
    env, raw, out = stage1_workspace["env"], stage1_workspace["raw"], stage1_test_predictions
    for case in stage1_workspace["test"]:
        assert_same_geometry(raw / "imagesTs" / f"{case}_0000.nii.gz", out / f"{case}.nii.gz")
    plans_file = stage1_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "plans.json"
    # evaluate_folder writes summary.json into the folder it evaluates: a copy keeps the shared predictions clean
    evaluated = tmp_path / "stage1"
    shutil.copytree(out, evaluated)
    run_command([bin_command("nnUNetv2_evaluate_folder"), str(raw / "labelsTs"), str(evaluated),
                 "-djfile", str(raw / "dataset.json"), "-pfile", str(plans_file)], env)
    summary = json.loads((evaluated / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert len(summary["metric_per_case"]) == len(stage1_workspace["test"])

    # the compare command's Dice on these real predictions is nnU-Net's, wherever nnU-Net's is defined
    compare = tmp_path / "compare"
    run_command([bin_command("nnUNetv2_rfmedsam_compare"), "--gt", str(raw / "labelsTs"), "--pred", f"stage1={out}",
                 "-o", str(compare), "--labels", str(raw / "dataset.json")], env)
    ours = {(c["case"], str(c["label"])): c["dice"]
            for c in json.loads((compare / "metrics.json").read_text())["cases"]}
    for entry in summary["metric_per_case"]:
        case = entry["reference_file"].split("/")[-1].removesuffix(".nii.gz")
        for label, values in entry["metrics"].items():
            if not np.isnan(values["Dice"]):
                assert abs(ours[(case, label)] - values["Dice"]) < 1e-4, (case, label)


def test_interrupted_training_resumes_with_continue_flag(stage1_workspace):
    """The workspace's stage 1 was killed in epoch 1 of 2 (conftest): `--c` picks up the last checkpoint written
    and trains only the missing epoch."""
    resumed = stage1_workspace["stage1_resumed_output"]
    assert re.search(r": Epoch 1\s*$", resumed, re.MULTILINE) and not re.search(r": Epoch 0\s*$", resumed, re.MULTILINE)
    final = stage1_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "fold_all" / "checkpoint_final.pth"
    assert torch.load(final, map_location="cpu", weights_only=False)["current_epoch"] == 2
