"""Stage 2 and the cascade through the stock nnU-Net commands, on real hippocampus cases (tiny budget)."""
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (DATASET_ID, DATASET_NAME, PLANS, STAGE1_FOLDER, STAGE2_FOLD, STAGE2_FOLDER, bin_command,
                      run_command, stage2_fold_folder, stage2_trainer, train_stage2)


def test_stage2_trains_from_an_official_format_checkpoint(stage2_workspace, tiny_checkpoint):
    fold = stage2_workspace["root"] / "results" / DATASET_NAME / STAGE2_FOLDER / f"fold_{STAGE2_FOLD}"
    assert (fold / "checkpoint_final.pth").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log*"))
    assert f"Loaded SAM 2 (tiny) weights from {tiny_checkpoint}" in log
    assert "trainable of" in log


def test_stage2_resumes_with_continue_flag_after_a_kill_in_mid_epoch(stage2_workspace):
    """The workspace's stage 2 was killed in epoch 1 of 2 (conftest). `--c` goes on from the last checkpoint
    written (checkpoint_best.pth of epoch 0: nnU-Net writes checkpoint_latest.pth every 50 epochs) and trains epoch 1
    only."""
    resumed = stage2_workspace["stage2_resumed_output"]
    assert re.search(r": Epoch 1\s*$", resumed, re.MULTILINE) and not re.search(r": Epoch 0\s*$", resumed, re.MULTILINE)
    fold = stage2_fold_folder(stage2_workspace)
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 2
    assert not list(fold.glob(".*.tmp.*"))


def test_a_checkpoint_write_that_fails_keeps_the_previous_checkpoint(in_process_trainer, monkeypatch):
    trainer = in_process_trainer()
    trainer.initialize()
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    written = path.stat()

    def fails_halfway(checkpoint, filename, *args, **kwargs):
        Path(filename).write_bytes(b"the first bytes of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(str(path))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (written.st_size, written.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".pth")) == ["checkpoint_latest.pth"]


def test_stage2_refuses_a_missing_checkpoint_naming_the_file(stage1_workspace, tmp_path):
    missing = tmp_path / "nowhere" / "sam2.1_hiera_tiny.pt"
    proc = train_stage2(stage1_workspace, {"RFMEDSAM2_SAM2_CHECKPOINT": str(missing)}, expect_success=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr + proc.stdout


@pytest.fixture
def in_process_trainer(stage1_workspace, monkeypatch):
    """Builds nnUNetTrainerRFMedSAM2 of the workspace as nnUNetv2_train does (plans and dataset.json from the
    preprocessed folder), in this process, for fold 3, whose folder is removed afterwards."""
    root = stage1_workspace["root"]
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # nnU-Net 2.8 reads them when used
        monkeypatch.setenv(variable, stage1_workspace["env"][variable])
    yield lambda: stage2_trainer(root / "preprocessed" / DATASET_NAME, 3)
    shutil.rmtree(root / "results" / DATASET_NAME / STAGE2_FOLDER / "fold_3", ignore_errors=True)


def test_stage2_without_checkpoint_says_how_to_get_one(in_process_trainer, monkeypatch):
    from nnunetv2_rfmedsam.model.sam2_checkpoint import SAM2CheckpointError
    monkeypatch.delenv("RFMEDSAM2_SAM2_CHECKPOINT", raising=False)
    monkeypatch.delenv("RFMEDSAM2_ALLOW_RANDOM_INIT", raising=False)
    trainer = in_process_trainer()
    trainer.initialize()
    with pytest.raises(SAM2CheckpointError, match="RFMEDSAM2_SAM2_CHECKPOINT is not set.*sam2.1_hiera_tiny.pt"):
        trainer.load_initial_weights()


def test_stage2_lists_cases_without_stage1_predictions(stage1_workspace, in_process_trainer, tmp_path):
    from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import StageOnePredictionsMissing
    folder = stage1_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "predicted_next_stage" / "3d_rfmedsam2"
    case = stage1_workspace["train"][0]
    moved = [shutil.move(str(p), tmp_path / p.name) for p in folder.glob(f"{case}.*")]
    try:
        with pytest.raises(StageOnePredictionsMissing, match=f"stage-1 predictions missing in {folder} .*{case}"):
            in_process_trainer().check_stage1_predictions()
    finally:
        for path in moved:
            shutil.move(path, folder / path.name)


def test_pretrained_weights_are_kept_not_overwritten_by_sam2s_checkpoint(stage2_workspace, in_process_trainer,
                                                                         tiny_checkpoint, monkeypatch, tmp_path):
    """`nnUNetv2_train ... -pretrained_weights F` loads F after `initialize()`; training then starts. The decoder
    heads F brings must survive the start, where SAM 2's checkpoint is loaded otherwise."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    monkeypatch.setenv("RFMEDSAM2_SAM2_CHECKPOINT", str(tiny_checkpoint))
    head = "sam_mask_decoder.pred_obj_score_head.layers.0.weight"  # trains, and is part of SAM 2's checkpoint
    official = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)["model"][head]
    checkpoint = torch.load(stage2_workspace["root"] / "results" / DATASET_NAME / STAGE2_FOLDER /
                            f"fold_{STAGE2_FOLD}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["network_weights"][f"sam.{head}"] = official + 0.5  # unmistakably not SAM 2's
    pretrained = tmp_path / "pretrained.pth"
    torch.save(checkpoint, pretrained)

    trainer = in_process_trainer()
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(pretrained))
    trainer.load_initial_weights()
    torch.testing.assert_close(trainer.network_module.state_dict()[f"sam.{head}"], official + 0.5)
    for key, value in checkpoint["network_weights"].items():
        assert torch.equal(trainer.network_module.state_dict()[key], value), key

    fresh = in_process_trainer()  # without -pretrained_weights, training starts from SAM 2's checkpoint
    fresh.initialize()
    fresh.load_initial_weights()
    torch.testing.assert_close(fresh.network_module.state_dict()[f"sam.{head}"], official)


def test_inference_commands_predict_stage1_then_the_cascade_with_the_trained_folds(stage2_workspace, tiny_checkpoint,
                                                                                   monkeypatch, capsys):
    """Stage 1's command, a comment naming the SAM 2 file stage 2's checkpoint reads, the cascade's command."""
    from nnunetv2_rfmedsam.cli import inference_commands
    from nnunetv2_rfmedsam.model.sam2_reference import file_sha256
    monkeypatch.setenv("nnUNet_results", stage2_workspace["env"]["nnUNet_results"])
    monkeypatch.setenv("nnUNet_raw", stage2_workspace["env"]["nnUNet_raw"])
    inference_commands.main(["-d", str(DATASET_ID), "-i", "IN", "-o", "OUT"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"nnUNetv2_predict -i IN -o OUT/stage1 -d {DATASET_ID} -p {PLANS} -c 3d_fullres "
                        f"-tr nnUNetTrainerRFPrompt -f all")
    assert lines[1].startswith("# stage 2 reads SAM 2's frozen weights from sam2.1_hiera_tiny.pt")
    assert file_sha256(tiny_checkpoint)[:16] in lines[1] and str(tiny_checkpoint.resolve()) in lines[1]
    assert "export RFMEDSAM2_SAM2_CHECKPOINT=/path/to/sam2.1_hiera_tiny.pt" in lines[1]
    assert lines[2:] == [f"nnUNetv2_predict -i IN -o OUT/cascade -d {DATASET_ID} -p {PLANS} -c 3d_rfmedsam2 "
                         f"-tr nnUNetTrainerRFMedSAM2 -f {STAGE2_FOLD} -prev_stage_predictions OUT/stage1"]


def test_inference_commands_prefer_the_five_folds_and_name_a_stage_without_any(tmp_path):
    from nnunetv2_rfmedsam.cli.inference_commands import (NoTrainedFolds, UnreadableCheckpoint, inference_commands,
                                                          trained_folds)
    model = tmp_path / "model"
    for fold in ("all", "0", "1", "2", "3"):
        (model / f"fold_{fold}").mkdir(parents=True)
        (model / f"fold_{fold}" / "checkpoint_final.pth").touch()
    (model / "fold_4").mkdir()
    (model / "fold_4" / "checkpoint_latest.pth").touch()  # still training
    assert trained_folds(model) == ["all"]
    (model / "fold_4" / "checkpoint_final.pth").touch()
    assert trained_folds(model) == ["0", "1", "2", "3", "4"]
    with pytest.raises(NoTrainedFolds, match=f"{tmp_path}/Dataset004_X/nnUNetTrainerRFPrompt__.*: no fold"):
        inference_commands(tmp_path, "Dataset004_X", 4, PLANS, "IN", "OUT")
    stage2 = tmp_path / "Dataset004_X" / f"nnUNetTrainerRFMedSAM2__{PLANS}__3d_rfmedsam2"
    shutil.copytree(model, tmp_path / "Dataset004_X" / f"nnUNetTrainerRFPrompt__{PLANS}__3d_fullres")
    shutil.copytree(model, stage2)  # its checkpoint files are empty
    with pytest.raises(UnreadableCheckpoint, match=f"{stage2}/fold_0/checkpoint_final.pth: not a readable nnU-Net"):
        inference_commands(tmp_path, "Dataset004_X", 4, PLANS, "IN", "OUT")


def test_cascade_refuses_a_missing_stage1_prediction_before_predicting_anything(stage2_workspace,
                                                                                 stage1_test_predictions, tmp_path):
    """The stock cascade with one held-out case's stage-1 prediction missing stops before the first case, naming
    it (nnU-Net alone would predict the cases before it and end with "Background workers died")."""
    test = stage2_workspace["test"]
    incomplete, out = tmp_path / "stage1", tmp_path / "cascade"
    incomplete.mkdir()
    for case in test[:-1]:
        shutil.copy(stage1_test_predictions / f"{case}.nii.gz", incomplete)
    proc = run_command([bin_command("nnUNetv2_predict"), "-i", str(stage2_workspace["raw"] / "imagesTs"),
                        "-o", str(out), "-d", str(DATASET_ID), "-p", PLANS, "-c", "3d_rfmedsam2",
                        "-tr", "nnUNetTrainerRFMedSAM2", "-f", STAGE2_FOLD, "-prev_stage_predictions", str(incomplete),
                        "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], stage2_workspace["env"],
                       expect_success=False)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "CascadeInputError" in last_line and f"{test[-1]}.nii.gz does not exist" in last_line, last_line
    assert not list(out.glob("*.nii.gz"))


def test_nnunet_compile_compiles_sam2s_per_slice_modules_never_the_network(in_process_trainer, monkeypatch):
    """`nnUNet_compile=t` where nnU-Net compiles (its rule is faked true here: it keeps compile off on the CPU): the
    trainer compiles SAM 2's per-slice modules, not the network with its walk through the slices; otherwise
    nothing."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch._dynamo import OptimizedModule
    from nnunetv2_rfmedsam.model import compilation
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(compilation, "DEFAULT_BACKEND", "eager")
    for setting, compiles in (("t", True), ("f", False)):
        monkeypatch.setenv("nnUNet_compile", setting)
        trainer = in_process_trainer()
        trainer.initialize()
        assert not isinstance(trainer.network, OptimizedModule)
        assert compilation.is_compiled(trainer.network_module.sam) is compiles
