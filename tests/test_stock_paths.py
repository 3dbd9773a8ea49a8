"""Stage 2 through the rest of nnU-Net's stock paths, on the trained workspace (tiny budget, real cases): the
validation flags, models shared as zip files and installed in another results folder, the cascade split over
machines (-num_parts), from a model folder, from Python with folder_with_segs_from_prev_stage, -chk, and
nnUNetv2_ensemble.

Two checkpoint variants make the checkpoint a prediction used visible: with the prompt gates closed (0) the
refiner returns stage 1's segmentation voxel for voxel whatever SAM 2's weights are (here random ones); with them
open (1) the output is random SAM 2's, unlike stage 1's."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import (DATASET_ID, DATASET_NAME, PLANS, STAGE1_FOLDER, STAGE2_FOLD, STAGE2_FOLDER, assert_same_geometry,
                      bin_command, run_command, stage2_fold_folder, write_gated_checkpoint)

CLOSED_GATES = "checkpoint_closed_gates.pth"
OPEN_GATES = "checkpoint_open_gates.pth"
FILE_ENDING = ".nii.gz"


def label_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def probabilities(path: Path) -> np.ndarray:
    return np.load(path)["probabilities"]


def run_entry_point(entry_point, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An nnU-Net console command in this process (it reads sys.argv, and its folders from the environment)."""
    monkeypatch.setattr(sys, "argv", argv)
    entry_point()


@pytest.fixture(scope="module")
def installed_results(stage2_workspace, tmp_path_factory):
    """Both stages exported with nnUNetv2_export_model_to_zip (stage 1 fold all, stage 2 fold 0) and installed with
    nnUNetv2_install_pretrained_model_from_zip into an empty nnUNet_results, as on another machine; stage 2's
    installed fold then gets the two gated checkpoints beside its checkpoint_final.pth."""
    from nnunetv2.model_sharing.entry_points import export_pretrained_model_entry, install_from_zip_entry_point
    env = stage2_workspace["env"]
    zips, installed = tmp_path_factory.mktemp("zips"), tmp_path_factory.mktemp("installed_results")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            patch.setenv(variable, env[variable])
        for name, configuration, trainer, fold in (("stage1", "3d_fullres", "nnUNetTrainerRFPrompt", "all"),
                                                   ("stage2", "3d_rfmedsam2", "nnUNetTrainerRFMedSAM2", STAGE2_FOLD)):
            run_entry_point(export_pretrained_model_entry,
                            ["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(zips / f"{name}.zip"),
                             "-c", configuration, "-tr", trainer, "-p", PLANS, "-f", fold], patch)
        patch.setenv("nnUNet_results", str(installed))
        for name in ("stage1", "stage2"):
            run_entry_point(install_from_zip_entry_point,
                            ["nnUNetv2_install_pretrained_model_from_zip", str(zips / f"{name}.zip")], patch)
    fold = installed / DATASET_NAME / STAGE2_FOLDER / f"fold_{STAGE2_FOLD}"
    assert sorted(p.name for p in fold.glob("*.pth")) == ["checkpoint_final.pth"]  # what the zip brings
    write_gated_checkpoint(fold / "checkpoint_final.pth", fold / CLOSED_GATES, 0.0)
    write_gated_checkpoint(fold / "checkpoint_final.pth", fold / OPEN_GATES, 1.0)
    return installed


@pytest.fixture(scope="module")
def one_case_images(stage2_workspace, tmp_path_factory):
    """A folder with the image of the first held-out case only."""
    case = stage2_workspace["test"][0]
    folder = tmp_path_factory.mktemp("one_case")
    shutil.copy(stage2_workspace["raw"] / "imagesTs" / f"{case}_0000{FILE_ENDING}", folder)
    return case, folder


@pytest.fixture(scope="module")
def cascade_in_two_parts(stage2_workspace, installed_results, stage1_test_predictions, tmp_path_factory):
    """The stock cascade from the installed stage 2 with the closed-gates checkpoint (-chk), default test-time
    mirroring, split as over two machines (-num_parts 2 -part_id 0/1), probabilities saved."""
    env = dict(stage2_workspace["env"], nnUNet_results=str(installed_results))
    parts = []
    for part in (0, 1):
        out = tmp_path_factory.mktemp(f"cascade_part{part}")
        run_command([bin_command("nnUNetv2_predict"), "-i", str(stage2_workspace["raw"] / "imagesTs"), "-o", str(out),
                     "-d", str(DATASET_ID), "-p", PLANS, "-c", "3d_rfmedsam2", "-tr", "nnUNetTrainerRFMedSAM2",
                     "-f", STAGE2_FOLD, "-chk", CLOSED_GATES, "-prev_stage_predictions", str(stage1_test_predictions),
                     "-device", "cpu", "-npp", "1", "-nps", "1", "-num_parts", "2", "-part_id", str(part),
                     "--save_probabilities"], env)
        parts.append(out)
    return parts


@pytest.fixture(scope="module")
def open_gates_from_model_folder(installed_results, stage1_test_predictions, one_case_images, stage2_workspace,
                                 tmp_path_factory):
    """nnUNetv2_predict_from_modelfolder on one case with the open-gates checkpoint (-chk), without mirroring."""
    _, images = one_case_images
    out = tmp_path_factory.mktemp("from_model_folder")
    model = installed_results / DATASET_NAME / STAGE2_FOLDER
    run_command([bin_command("nnUNetv2_predict_from_modelfolder"), "-i", str(images), "-o", str(out), "-m", str(model),
                 "-f", STAGE2_FOLD, "-chk", OPEN_GATES, "-prev_stage_predictions", str(stage1_test_predictions),
                 "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", "--save_probabilities"],
                stage2_workspace["env"])
    return out


def test_cascade_split_into_parts_from_an_installed_model_writes_every_case_once_as_stage1(
        stage2_workspace, cascade_in_two_parts, stage1_test_predictions):
    """Each part writes its own cases, together all of them; with the gates closed the refiner, installed from a
    zip and chosen with -chk, returns stage 1's segmentation voxel for voxel with the input's geometry."""
    raw, test = stage2_workspace["raw"], stage2_workspace["test"]
    written = [{p.name.removesuffix(FILE_ENDING) for p in part.glob(f"*{FILE_ENDING}")}
               for part in cascade_in_two_parts]
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == set(test)
    foreground = 0
    for part, cases in zip(cascade_in_two_parts, written):
        for case in cases:
            assert_same_geometry(raw / "imagesTs" / f"{case}_0000{FILE_ENDING}", part / f"{case}{FILE_ENDING}")
            stage1 = label_array(stage1_test_predictions / f"{case}{FILE_ENDING}")
            np.testing.assert_array_equal(label_array(part / f"{case}{FILE_ENDING}"), stage1, err_msg=case)
            assert probabilities(part / f"{case}.npz").shape == (3, *stage1.shape)
            foreground += int((stage1 > 0).sum())
    assert foreground > 0, "stage 1 predicted nothing: the comparison would be vacuous"


def test_chk_chooses_the_checkpoint_of_predict_from_modelfolder(open_gates_from_model_folder, one_case_images,
                                                                stage1_test_predictions, stage2_workspace):
    """With the open gates the output is random SAM 2's: not stage 1's, which the trained checkpoint_final (gates
    trained for one step, near 0) would give."""
    case, _ = one_case_images
    refined = label_array(open_gates_from_model_folder / f"{case}{FILE_ENDING}")
    assert_same_geometry(stage2_workspace["raw"] / "imagesTs" / f"{case}_0000{FILE_ENDING}",
                         open_gates_from_model_folder / f"{case}{FILE_ENDING}")
    assert (refined != label_array(stage1_test_predictions / f"{case}{FILE_ENDING}")).any()


def test_nnunet_predictor_from_python_predicts_both_stages_as_the_commands(installed_results, one_case_images,
                                                                           stage1_test_predictions,
                                                                           open_gates_from_model_folder,
                                                                           stage2_workspace, one_torch_thread,
                                                                           monkeypatch, tmp_path):
    """nnUNetPredictor in a Python program, on the installed models: stage 1, then stage 2 with
    folder_with_segs_from_prev_stage, give what nnUNetv2_predict and nnUNetv2_predict_from_modelfolder wrote."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    monkeypatch.setenv("nnUNet_extTrainer", stage2_workspace["env"]["nnUNet_extTrainer"])  # finds the trainers
    case, images = one_case_images
    results = installed_results / DATASET_NAME

    def predictor(model: str, fold: str, checkpoint: str) -> nnUNetPredictor:
        made = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
        made.initialize_from_trained_model_folder(str(results / model), (fold,), checkpoint)
        return made

    stage1_out, cascade_out = tmp_path / "stage1", tmp_path / "cascade"
    for folder in (stage1_out, cascade_out):  # predict_from_files_sequential writes its arguments there first
        folder.mkdir()
    predictor(STAGE1_FOLDER, "all", "checkpoint_final.pth").predict_from_files_sequential(str(images), str(stage1_out))
    np.testing.assert_array_equal(label_array(stage1_out / f"{case}{FILE_ENDING}"),
                                  label_array(stage1_test_predictions / f"{case}{FILE_ENDING}"))
    predictor(STAGE2_FOLDER, STAGE2_FOLD, OPEN_GATES).predict_from_files_sequential(
        str(images), str(cascade_out), save_probabilities=True, folder_with_segs_from_prev_stage=str(stage1_out))
    np.testing.assert_array_equal(label_array(cascade_out / f"{case}{FILE_ENDING}"),
                                  label_array(open_gates_from_model_folder / f"{case}{FILE_ENDING}"))
    np.testing.assert_allclose(probabilities(cascade_out / f"{case}.npz"),
                               probabilities(open_gates_from_model_folder / f"{case}.npz"), atol=1e-4)


def test_ensemble_of_two_stage2_models_averages_their_probabilities(open_gates_from_model_folder,
                                                                    cascade_in_two_parts, one_case_images,
                                                                    stage2_workspace, tmp_path):
    """nnUNetv2_ensemble of the open-gates and the closed-gates predictions of one case: the label map is the
    argmax of their mean probabilities, with the input's geometry."""
    case, _ = one_case_images
    closed = tmp_path / "closed_gates"
    closed.mkdir()
    part = next(p for p in cascade_in_two_parts if (p / f"{case}.npz").is_file())
    for name in (f"{case}.npz", f"{case}.pkl", "plans.json", "dataset.json"):
        shutil.copy(part / name, closed / name)
    out = tmp_path / "ensemble"
    run_command([bin_command("nnUNetv2_ensemble"), "-i", str(open_gates_from_model_folder), str(closed), "-o", str(out),
                 "-np", "1"], stage2_workspace["env"])
    mean = (probabilities(open_gates_from_model_folder / f"{case}.npz") + probabilities(closed / f"{case}.npz")) / 2
    ensembled = label_array(out / f"{case}{FILE_ENDING}")
    np.testing.assert_array_equal(ensembled, mean.argmax(0))
    assert_same_geometry(stage2_workspace["raw"] / "imagesTs" / f"{case}_0000{FILE_ENDING}",
                         out / f"{case}{FILE_ENDING}")


def test_val_with_best_checkpoint_and_npz_reruns_stage2s_validation(stage2_workspace):
    """`nnUNetv2_train ... --val --val_best --npz` validates again from checkpoint_best.pth (here the open-gates
    variant, so that its use shows) and writes the probabilities."""
    fold = stage2_fold_folder(stage2_workspace)
    validation_case = stage2_workspace["train"][0]
    seg_file = fold / "validation" / f"{validation_case}{FILE_ENDING}"
    from_training = label_array(seg_file)  # the final validation of training, with checkpoint_final.pth
    best, kept = fold / "checkpoint_best.pth", fold / "kept_checkpoint_best.pth"
    shutil.copy(best, kept)
    try:
        write_gated_checkpoint(kept, best, 1.0)
        run_command([bin_command("nnUNetv2_train"), str(DATASET_ID), "3d_rfmedsam2", STAGE2_FOLD, "-p", PLANS,
                     "-tr", "nnUNetTrainerRFMedSAM2", "-device", "cpu", "--val", "--val_best", "--npz"],
                    stage2_workspace["env"])
    finally:
        shutil.move(kept, best)
    validated = label_array(seg_file)
    assert (validated != from_training).any(), "--val_best gave checkpoint_final's validation"
    label = stage2_workspace["raw"] / "labelsTr" / f"{validation_case}{FILE_ENDING}"
    assert validated.shape == label_array(label).shape
    npz = probabilities(fold / "validation" / f"{validation_case}.npz")
    assert npz.shape == (3, *validated.shape)
    np.testing.assert_allclose(npz.sum(0), 1.0, atol=1e-3)
    assert (fold / "validation" / "summary.json").is_file()
