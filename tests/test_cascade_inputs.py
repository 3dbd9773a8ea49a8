"""The cascade's stage-1 predictions are checked before any case is predicted (real hippocampus files; the
stock command's refusal is in test_stage2_cli.py)."""
import shutil

import pytest
import SimpleITK as sitk

from nnunetv2_rfmedsam.cascade_inputs import CascadeInputError, check_stage1_predictions
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
