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
from nnunetv2_rfmedsam.cascade_inputs import CascadeInputError, check_images_finite, check_stage1_predictions
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases


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


def test_usable_predictions_pass(cases):
    _, images, stage1, folder = cases
    check_stage1_predictions(images, stage1, str(folder))


def test_every_problem_is_named_in_one_line(cases):
    names, images, stage1, folder = cases
    (folder / f"{names[0]}.nii.gz").unlink()
    shutil.copy(hippocampus_source() / "labelsTr" / f"{list_cases(hippocampus_source())[10]}.nii.gz", stage1[1])
    resampled = sitk.ReadImage(stage1[2])
    resampled.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(resampled, stage1[2])
    with pytest.raises(CascadeInputError) as error:
        check_stage1_predictions(images, stage1, str(folder))
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
        check_stage1_predictions(images, stage1, str(folder))


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


def test_images_with_non_finite_voxels_are_named(non_finite_images):
    """Read as the plans' reader reads them: nibabel keeps NaN and infinity; SimpleITK's NIfTI reader (ITK 5) turns
    them into 0, so that what nnU-Net predicts from with SimpleITKIO plans is finite."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    size = sitk.GetArrayViewFromImage(sitk.ReadImage(non_finite_images[0][0])).size
    with pytest.raises(CascadeInputError) as error:
        check_images_finite(non_finite_images, NibabelIO())
    message = str(error.value)
    assert "\n" not in message and message.startswith("2 image(s) the cascade cannot use: ")
    assert f"{non_finite_images[0][0]} has 1 of {size} voxels not finite (NaN or infinite)" in message
    assert f"{non_finite_images[2][0]} has 2 of" in message and non_finite_images[1][0] not in message
    assert message.endswith("nothing was predicted")
    check_images_finite(non_finite_images, SimpleITKIO())


def test_files_of_integer_voxels_are_not_read(non_finite_images):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    as_integers = str(Path(non_finite_images[1][0]).with_name("integers_0000.nii.gz"))
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(non_finite_images[1][0]), sitk.sitkInt16), as_integers)
    read = []

    class RecordingReader(SimpleITKIO):
        def read_images(self, files):
            read.append(files)
            return super().read_images(files)

    check_images_finite([[as_integers], non_finite_images[1]], RecordingReader())
    assert read == [non_finite_images[1]]


def test_the_cascade_refuses_a_non_finite_image_before_predicting_any_case(planned_workspace, cases,
                                                                          non_finite_images, tmp_path):
    """nnU-Net's own predictor with a refiner (untrained: nothing runs it), on plans that read NIfTI with nibabel,
    stops before its first case."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2
    preprocessed = planned_workspace["root"] / "preprocessed" / DATASET_NAME
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    plans_manager = PlansManager(dict(plans, image_reader_writer="NibabelIO"))
    configuration = plans_manager.get_configuration("3d_rfmedsam2")
    network = nnUNetTrainerRFMedSAM2.build_network_architecture(plans_manager, configuration, 3, 3, False)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()],
                                    json.loads((preprocessed / "dataset.json").read_text()),
                                    "nnUNetTrainerRFMedSAM2", None)
    out = tmp_path / "cascade"
    with pytest.raises(CascadeInputError) as error:
        predictor.predict_from_files(str(Path(non_finite_images[0][0]).parent), str(out),
                                     folder_with_segs_from_prev_stage=str(cases[3]),
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
    assert "\n" not in str(error.value) and f"{non_finite_images[0][0]} has 1 of" in str(error.value)
    assert not list(out.glob("*.nii.gz"))
