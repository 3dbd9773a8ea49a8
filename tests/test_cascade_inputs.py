"""The cascade's stage-1 predictions and images are checked before any case is predicted (real hippocampus files;
the stock command's refusal is in test_stage2_cli.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_NAME, PLANS
from nnunetv2_rfmedsam.cascade_inputs import (CascadeInputError, check_channel_counts, check_images,
                                              check_stage1_predictions)
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases


LABELS = [0, 1, 2]  # the hippocampus dataset's


@pytest.fixture
def cases(tmp_path):
    """Three real cases: their images, and their labels standing in for stage-1 predictions in one folder."""
    source = hippocampus_source()
    names = list_cases(source)[:3]
    folder = tmp_path / "stage1"
    folder.mkdir()
    images = [[str(source / "imagesTr" / f"{name}_0000.nii.gz")] for name in names]
    for name in names:
        shutil.copy(source / "labelsTr" / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    return names, images, [str(folder / f"{name}.nii.gz") for name in names], folder


def rewritten(path: str, change) -> sitk.Image:
    """Read an image, let `change` alter it in place, write it back; returns it."""
    image = sitk.ReadImage(path)
    change(image)
    sitk.WriteImage(image, path)
    return image


def test_usable_predictions_pass(cases):
    _, images, stage1, folder = cases
    check_stage1_predictions(images, stage1, str(folder), LABELS)


def test_every_problem_is_named_in_one_line(cases):
    names, images, stage1, folder = cases
    (folder / f"{names[0]}.nii.gz").unlink()
    shutil.copy(hippocampus_source() / "labelsTr" / f"{list_cases(hippocampus_source())[10]}.nii.gz", stage1[1])
    rewritten(stage1[2], lambda image: image.SetSpacing((2.0, 2.0, 2.0)))
    with pytest.raises(CascadeInputError) as error:
        check_stage1_predictions(images, stage1, str(folder), LABELS)
    message = str(error.value)
    assert "\n" not in message and f"-prev_stage_predictions {folder}: 3 of 3 case(s)" in message
    assert f"{names[0]}.nii.gz does not exist" in message
    assert f"{names[1]}.nii.gz has size" in message and f"its image {names[1]}_0000.nii.gz" in message
    assert f"{names[2]}.nii.gz has spacing (2.0, 2.0, 2.0)" in message
    assert "nothing was predicted" in message


def test_a_corrupt_prediction_is_named(cases):
    names, images, stage1, folder = cases
    (folder / f"{names[1]}.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CascadeInputError, match=f"1 of 3 case.*{names[1]}.nii.gz cannot be read"):
        check_stage1_predictions(images, stage1, str(folder), LABELS)


def write_changed_image(source: str, target, change) -> str:
    """A copy of an image file with `change` applied to its voxels (in place, on a float32 array)."""
    image = sitk.ReadImage(source)
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    change(voxels)
    changed = sitk.GetImageFromArray(voxels)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(target))
    return str(target)


@pytest.fixture
def non_finite_images(cases, tmp_path):
    """The cases' images in a folder of their own: the first with a NaN voxel, the third with two infinite ones."""
    names, images, _, _ = cases
    folder = tmp_path / "images"
    folder.mkdir()
    changes = [lambda v: v.__setitem__((3, 10, 10), np.nan), lambda v: None,
               lambda v: v.__setitem__((slice(0, 2), 0, 0), [np.inf, -np.inf])]
    return [[write_changed_image(files[0], folder / f"{name}_0000.nii.gz", change)]
            for name, files, change in zip(names, images, changes)]


def test_images_with_non_finite_voxels_are_named_whatever_the_reader(non_finite_images):
    """NIfTI files are checked as stored: nibabel keeps NaN and infinity, SimpleITK's NIfTI reader (ITK 5) turns
    them into 0, which would hide an image of NaN only."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    size = sitk.GetArrayViewFromImage(sitk.ReadImage(non_finite_images[0][0])).size
    for reader in NibabelIO(), SimpleITKIO():
        with pytest.raises(CascadeInputError) as error:
            check_images(non_finite_images, reader)
        message = str(error.value)
        assert "\n" not in message and message.startswith("2 image(s) cannot be predicted from: ")
        assert f"{non_finite_images[0][0]} has 1 of {size} voxels not finite (NaN or infinite)" in message
        assert f"{non_finite_images[2][0]} has 2 of" in message and non_finite_images[1][0] not in message
        assert message.endswith("nothing was predicted")


def test_an_image_of_nan_only_is_refused_though_simpleitk_reads_zeros(cases, tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    nan_only = write_changed_image(cases[1][0][0], tmp_path / "nan_0000.nii.gz", lambda v: v.fill(np.nan))
    assert not sitk.GetArrayFromImage(sitk.ReadImage(nan_only)).any()  # what nnU-Net would predict from
    with pytest.raises(CascadeInputError, match="^1 image.*nan_0000.nii.gz has (\\d+) of \\1 voxels not finite"):
        check_images([[nan_only]], SimpleITKIO())


def test_non_nifti_files_of_integer_voxels_are_not_read(non_finite_images):
    """Files other than NIfTI are read with the plans' reader, only where their header says float voxels."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    image = sitk.ReadImage(non_finite_images[1][0])
    as_integers, as_floats = (str(Path(non_finite_images[1][0]).with_name(name)) for name in ("i_0000.mha",
                                                                                               "f_0000.mha"))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), as_integers)
    sitk.WriteImage(image, as_floats)
    read = []

    class RecordingReader(SimpleITKIO):
        def read_images(self, files):
            read.append(files)
            return super().read_images(files)

    check_images([[as_integers], [as_floats], non_finite_images[1]], RecordingReader())
    assert read == [[as_floats]]


def truncated_copy(source, target, size: int) -> str:
    """The first `size` bytes of `source`, as a damaged copy would be."""
    Path(target).write_bytes(Path(source).read_bytes()[:size])
    return str(target)


def test_truncated_images_are_named(cases, tmp_path):
    """SimpleITK reads a .nii.gz cut to 2 KB as a whole image (mostly zeros); a .nii short of its last voxel too."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    names, images, _, _ = cases
    gz = truncated_copy(images[0][0], tmp_path / f"{names[0]}_0000.nii.gz", 2048)
    uncompressed = tmp_path / f"{names[1]}_0000.nii"
    sitk.WriteImage(sitk.ReadImage(images[1][0]), str(uncompressed))
    nii = truncated_copy(uncompressed, uncompressed, uncompressed.stat().st_size - 4)
    no_trailer = truncated_copy(images[2][0], tmp_path / f"{names[2]}_0000.nii.gz",
                                Path(images[2][0]).stat().st_size - 8)  # all voxels, not the gzip trailer
    assert sitk.ReadImage(gz).GetSize() == sitk.ReadImage(images[0][0]).GetSize()  # nnU-Net's reader: no error
    with pytest.raises(CascadeInputError) as error:
        check_images([[gz], [nii], [no_trailer], images[1]], SimpleITKIO())
    message = str(error.value)
    assert "\n" not in message and message.startswith("3 image(s) cannot be predicted from: ")
    assert f"{gz} is damaged: its gzip stream is cut short or corrupt" in message
    assert f"{nii} is cut short: " in message and images[1][0] not in message
    assert f"{no_trailer} is damaged" in message


def test_cases_without_one_file_per_channel_are_named(cases):
    names, images, _, _ = cases
    two = [images[0][0], images[0][0].replace("_0000", "_0001")]
    check_channel_counts(images, {"0": "MRI"})
    with pytest.raises(CascadeInputError) as error:
        check_channel_counts([images[1], two, images[2]], {"0": "MRI"})
    message = str(error.value)
    assert "\n" not in message and message.startswith("1 of 3 case(s) do not have one image file per channel of "
                                                      "dataset.json (1: MRI): ")
    assert f"{names[0]}_0000.nii.gz, {names[0]}_0001.nii.gz (2 file(s))" in message and names[1] not in message


def test_stage1_predictions_off_the_image_or_with_foreign_labels_are_named(cases):
    """A label dataset.json does not define (nnU-Net's one-hot encoding would drop it), an origin 50 mm away, a
    flipped axis and a file cut short: each named, each case once."""
    names, images, stage1, folder = cases
    sitk.WriteImage(sitk.ChangeLabel(sitk.ReadImage(stage1[0]), {1: 7}), stage1[0])
    shifted = rewritten(stage1[1], lambda image: image.SetOrigin(np.add(image.GetOrigin(), (50.0, 0.0, 0.0))))
    rewritten(stage1[2], lambda image: image.SetDirection(np.diag([-1.0, 1.0, 1.0]).ravel()))
    with pytest.raises(CascadeInputError) as error:
        check_stage1_predictions(images, stage1, str(folder), LABELS)
    message = str(error.value)
    assert "\n" not in message and f"-prev_stage_predictions {folder}: 3 of 3 case(s)" in message
    assert f"{names[0]}.nii.gz holds label(s) 7 that dataset.json does not define (labels 0, 1, 2)" in message
    assert (f"{names[1]}.nii.gz has origin {tuple(round(v, 4) for v in shifted.GetOrigin())}, its image "
            f"{names[1]}_0000.nii.gz") in message and "(50 mm away)" in message
    assert f"{names[2]}.nii.gz has direction (-1.0, 0.0, 0.0," in message
    truncated_copy(hippocampus_source() / "labelsTr" / f"{names[0]}.nii.gz", stage1[0], 1000)
    with pytest.raises(CascadeInputError, match=f"{names[0]}.nii.gz is damaged: its gzip stream is cut short"):
        check_stage1_predictions(images[:1], stage1[:1], str(folder), LABELS)


def untrained_predictor(planned_workspace, trainer, configuration_name: str, input_channels: int,
                        trainer_name: str):
    """nnU-Net's own predictor with `trainer`'s network (untrained: nothing runs it) on the workspace's plans, as
    nnUNetv2_predict builds it for a model of `trainer_name`."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    preprocessed = planned_workspace["root"] / "preprocessed" / DATASET_NAME
    plans_manager = PlansManager(str(preprocessed / f"{PLANS}.json"))
    configuration = plans_manager.get_configuration(configuration_name)
    network = trainer.build_network_architecture(plans_manager, configuration, input_channels, 3, False)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()],
                                    json.loads((preprocessed / "dataset.json").read_text()), trainer_name, None)
    return predictor


@pytest.fixture(scope="module")
def refiner_predictor(planned_workspace):
    from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2
    return untrained_predictor(planned_workspace, nnUNetTrainerRFMedSAM2, "3d_rfmedsam2", 3, "nnUNetTrainerRFMedSAM2")


def test_the_cascade_refuses_a_non_finite_image_before_predicting_any_case(refiner_predictor, cases,
                                                                          non_finite_images, tmp_path):
    out = tmp_path / "cascade"
    with pytest.raises(CascadeInputError) as error:
        refiner_predictor.predict_from_files(str(Path(non_finite_images[0][0]).parent), str(out),
                                             folder_with_segs_from_prev_stage=str(cases[3]),
                                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
    assert "\n" not in str(error.value) and f"{non_finite_images[0][0]} has 1 of" in str(error.value)
    assert not list(out.glob("*.nii.gz"))


def test_the_cascade_refuses_a_stage1_prediction_with_a_foreign_label(refiner_predictor, cases, tmp_path):
    """The labels come from the predictor's dataset.json (nnU-Net's label manager)."""
    names, images, stage1, folder = cases
    sitk.WriteImage(sitk.ChangeLabel(sitk.ReadImage(stage1[2]), {2: 7}), stage1[2])
    out = tmp_path / "cascade"
    with pytest.raises(CascadeInputError) as error:
        refiner_predictor.predict_from_files(images, str(out), folder_with_segs_from_prev_stage=str(folder),
                                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"-prev_stage_predictions {folder}: 1 of 3")
    assert f"{names[2]}.nii.gz holds label(s) 7 that dataset.json does not define" in str(error.value)
    assert not list(out.glob("*.nii.gz"))


def stage1_predictor(planned_workspace, trainer_name: str):
    """Stage 1's network in nnU-Net's predictor, as a model of `trainer_name`."""
    from nnunetv2_rfmedsam.trainers.prompt_trainer import nnUNetTrainerRFPrompt
    return untrained_predictor(planned_workspace, nnUNetTrainerRFPrompt, "3d_fullres", 1, trainer_name)


@pytest.fixture
def unchecked_predictor(monkeypatch):
    """nnU-Net's predictor as it is before the plugin's hook is installed (earlier tests installed it)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_rfmedsam import cascade_inputs
    stock = getattr(nnUNetPredictor, cascade_inputs._STOCK, None)
    if stock is not None:
        monkeypatch.setattr(nnUNetPredictor, "_manage_input_and_output_lists", stock)
        monkeypatch.delattr(nnUNetPredictor, cascade_inputs._STOCK)


def test_stage1_refuses_a_truncated_image_before_predicting_any_case(unchecked_predictor, planned_workspace, cases,
                                                                     tmp_path):
    """Through nnU-Net's own predictor for nnUNetTrainerRFPrompt, whose network installs the check; the stock
    nnUNetTrainer's inputs are not checked. (Lists of files: a folder costs nnU-Net a pool of 12 processes.)"""
    names, images, _, _ = cases
    truncated = truncated_copy(images[1][0], tmp_path / Path(images[1][0]).name, 2048)
    inputs = [images[0], [truncated]]
    out = tmp_path / "stage1_out"
    with pytest.raises(CascadeInputError) as error:
        stage1_predictor(planned_workspace, "nnUNetTrainerRFPrompt").predict_from_files(
            inputs, str(out), num_processes_preprocessing=1, num_processes_segmentation_export=1)
    assert str(error.value).startswith(f"1 image(s) cannot be predicted from: {truncated} is damaged")
    assert "\n" not in str(error.value) and not list(out.glob("*.nii.gz"))
    stock = stage1_predictor(planned_workspace, "nnUNetTrainer")
    assert stock._manage_input_and_output_lists(inputs, str(out))[0] == inputs
