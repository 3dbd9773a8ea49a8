"""Stage 1 through the stock nnU-Net commands, end to end on real hippocampus cases (tiny budget)."""
import json
import shutil

import numpy as np
import torch

from conftest import DATASET_ID, DATASET_NAME, PLANS, STAGE1_BUDGET, assert_same_geometry, bin_command, run_command

STAGE1_FOLDER = f"nnUNetTrainerRFPrompt__{PLANS}__3d_fullres"


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


def test_interrupted_training_resumes_with_continue_flag(planned_workspace):
    """`--c` picks up the last checkpoint and trains only the missing epochs. Fold 0 of a split with one
    validation case: each run ends with nnU-Net's final validation, which over fold `all` predicts every case.
    From the planned workspace, not the trained one: this test can run beside the trained workspace's tests."""
    workspace = planned_workspace
    train = workspace["train"]
    splits = workspace["root"] / "preprocessed" / DATASET_NAME / "splits_final.json"
    splits.write_text(json.dumps([{"train": train[1:], "val": train[:1]}]))
    command = [bin_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-p", PLANS,
               "-tr", "nnUNetTrainerRFPrompt", "-device", "cpu"]
    run_command(command, dict(workspace["env"], **STAGE1_BUDGET))
    proc = run_command(command + ["--c"], dict(workspace["env"], **dict(STAGE1_BUDGET, RFMEDSAM2_NUM_EPOCHS="2")))
    assert "Epoch 1" in proc.stdout and "Epoch 0\n" not in proc.stdout
    final = workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "fold_0" / "checkpoint_final.pth"
    assert torch.load(final, map_location="cpu", weights_only=False)["current_epoch"] == 2
