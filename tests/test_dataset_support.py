"""Datasets RFMedSAM 2 refuses (regions, more than three channels), and nnU-Net versions it refuses."""
import json

import pytest
import torch

from nnunetv2_rfmedsam import check_nnunet_version
from nnunetv2_rfmedsam.dataset_support import UnsupportedDataset, check_dataset_supported
from nnunetv2_rfmedsam.raw_dataset import write_raw_dataset
from nnunetv2_rfmedsam.trainers.prompt_trainer import nnUNetTrainerBudget, nnUNetTrainerRFPrompt
from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2

HIPPOCAMPUS_LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
# BraTS-style: the whole hippocampus as a region over both labels, then the posterior part
REGION_LABELS = {"background": 0, "hippocampus": [1, 2], "posterior": 2}


def dataset_json(labels=HIPPOCAMPUS_LABELS, channels=1, **extra):
    return {"channel_names": {str(c): "MRI" for c in range(channels)}, "labels": labels, "file_ending": ".nii.gz",
            "numTraining": 2, **extra}


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_label_datasets_with_up_to_three_channels_are_accepted(channels):
    check_dataset_supported(dataset_json(channels=channels), "dataset.json")


def test_region_datasets_are_refused_naming_the_file():
    with pytest.raises(UnsupportedDataset, match=r"^/data/x/dataset.json: region-based labels"):
        check_dataset_supported(dataset_json(REGION_LABELS, regions_class_order=[1, 2]), "/data/x/dataset.json")
    # nnU-Net's rule: a list label is a region even without regions_class_order
    with pytest.raises(UnsupportedDataset, match="region-based"):
        check_dataset_supported(dataset_json(REGION_LABELS), "dataset.json")


def test_more_than_three_channels_are_refused():
    with pytest.raises(UnsupportedDataset, match="4 image channels; SAM 2 takes at most 3"):
        check_dataset_supported(dataset_json(channels=4), "dataset.json")


@pytest.mark.parametrize("trainer", [nnUNetTrainerRFPrompt, nnUNetTrainerRFMedSAM2])
def test_both_trainers_refuse_a_region_dataset_before_building_anything(trainer):
    with pytest.raises(UnsupportedDataset, match="dataset.json of Dataset005_Regions: region-based"):
        trainer({"dataset_name": "Dataset005_Regions"}, "3d_fullres", 0, dataset_json(REGION_LABELS),
                torch.device("cpu"))


def test_the_baseline_trainer_stays_stock_nnunet():
    assert not any(base.__name__ == "SupportedDatasetMixin" for base in nnUNetTrainerBudget.__mro__)


def test_planning_refuses_a_region_dataset_before_writing_anything(hippocampus_cases, tmp_path, monkeypatch, capsys):
    from nnunetv2_rfmedsam.cli import plan_and_preprocess
    source, train, _ = hippocampus_cases
    raw = write_raw_dataset(source, tmp_path / "raw" / "Dataset005_Regions", train[:2])
    (raw / "dataset.json").write_text(json.dumps(dataset_json(REGION_LABELS, regions_class_order=[1, 2])))
    # the command's own entry point, in this process: nnU-Net 2.8 reads its folders from the environment when used
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    with pytest.raises(SystemExit) as exited:
        plan_and_preprocess.main(["-d", "5", "-c", "3d_fullres", "-np", "1", "-npfp", "1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"nnUNetv2_rfmedsam_plan_and_preprocess: error: {raw / 'dataset.json'}: region-based labels "
        f"(regions_class_order / labels that list several values) are not supported by RFMedSAM 2, which refines one "
        f"softmax class per label; give each structure its own label value, or train this dataset with stock nnU-Net"]
    assert not (tmp_path / "pre").exists()


@pytest.mark.parametrize("version", ["2.8.0", "2.8.1", "2.8.4", "2.9.0"])
def test_nnunet_from_2_8_is_accepted(version):
    check_nnunet_version(version)


@pytest.mark.parametrize("version", ["2.7.0", "2.6.4", "2.1"])
def test_older_nnunet_is_refused_naming_the_version(version):
    with pytest.raises(ImportError, match=f"needs nnunetv2 >= 2.8 .* nnunetv2 {version} is installed"):
        check_nnunet_version(version)
