"""Stage 2 and the cascade through the stock nnU-Net commands, on real hippocampus cases (tiny budget)."""
import shutil

from conftest import (DATASET_ID, DATASET_NAME, PLANS, STAGE1_FOLDER, STAGE2_FOLD, STAGE2_FOLDER, assert_same_geometry,
                      bin_command, run_command, train_stage2)


def test_stage2_trains_from_an_official_format_checkpoint(stage2_workspace, tiny_checkpoint):
    fold = stage2_workspace["root"] / "results" / DATASET_NAME / STAGE2_FOLDER / f"fold_{STAGE2_FOLD}"
    assert (fold / "checkpoint_final.pth").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log*"))
    assert f"Loaded SAM 2 (tiny) weights from {tiny_checkpoint}" in log
    assert "trainable of" in log


def test_stage2_refuses_a_missing_checkpoint_naming_the_file(stage1_workspace, tmp_path):
    missing = tmp_path / "nowhere" / "sam2.1_hiera_tiny.pt"
    proc = train_stage2(stage1_workspace, {"RFMEDSAM2_SAM2_CHECKPOINT": str(missing)}, expect_success=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr + proc.stdout


def test_stage2_without_checkpoint_says_how_to_get_one(stage1_workspace):
    proc = train_stage2(stage1_workspace, {"RFMEDSAM2_SAM2_CHECKPOINT": "", "RFMEDSAM2_ALLOW_RANDOM_INIT": ""},
                        expect_success=False)
    assert proc.returncode != 0
    output = proc.stderr + proc.stdout
    assert "RFMEDSAM2_SAM2_CHECKPOINT is not set" in output and "sam2.1_hiera_tiny.pt" in output


def test_stage2_lists_cases_without_stage1_predictions(stage1_workspace, tiny_checkpoint, tmp_path):
    folder = stage1_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "predicted_next_stage" / "3d_rfmedsam2"
    case = stage1_workspace["train"][0]
    moved = [shutil.move(str(p), tmp_path / p.name) for p in folder.glob(f"{case}.*")]
    try:
        proc = train_stage2(stage1_workspace, {"RFMEDSAM2_SAM2_CHECKPOINT": str(tiny_checkpoint)}, expect_success=False)
    finally:
        for path in moved:
            shutil.move(path, folder / path.name)
    assert proc.returncode != 0
    assert "stage-1 predictions missing" in proc.stderr and case in proc.stderr


def test_stock_cascade_prediction_keeps_geometry(stage2_workspace, tmp_path):
    env, raw = stage2_workspace["env"], stage2_workspace["raw"]
    stage1_out, cascade_out = tmp_path / "stage1", tmp_path / "cascade"
    common = ["-d", str(DATASET_ID), "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1"]
    run_command([bin_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(stage1_out), "-c", "3d_fullres",
                 "-tr", "nnUNetTrainerRFPrompt", "-f", "all", *common], env)
    run_command([bin_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(cascade_out),
                 "-c", "3d_rfmedsam2", "-tr", "nnUNetTrainerRFMedSAM2", "-f", STAGE2_FOLD,
                 "-prev_stage_predictions", str(stage1_out), *common], env)
    for case in stage2_workspace["test"]:
        assert_same_geometry(raw / "imagesTs" / f"{case}_0000.nii.gz", cascade_out / f"{case}.nii.gz")
