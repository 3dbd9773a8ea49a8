"""Which nnU-Net datasets RFMedSAM 2 can refine, checked at planning and when a trainer starts.

Refused, with one line naming the dataset.json and the reason:
- region-based datasets (`regions_class_order`, labels that are lists of label values, e.g. BraTS): the refiner
  prompts and outputs one softmax class per label; nnU-Net's regions overlap and train with a sigmoid per region,
  so the network would miscount its classes and train on wrong targets without an error.
- more than three image channels: SAM 2's encoder takes three (RGB), and a fourth channel would have to be
  dropped. One channel becomes grey RGB, two become (c0, c1, their mean), three are RGB (model/frames.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SAM2_INPUT_CHANNELS = 3


class UnsupportedDataset(ValueError):
    pass


def has_regions(dataset_json: dict) -> bool:
    """nnU-Net's rule (LabelManager): a dataset is region-based when a label is a list of label values."""
    if dataset_json.get("regions_class_order") is not None:
        return True
    return any(isinstance(value, (list, tuple)) and len(value) > 1 for value in dataset_json.get("labels", {}).values())


def check_dataset_supported(dataset_json: dict, source: str) -> None:
    """Raise UnsupportedDataset naming `source` (the dataset.json's path or the dataset's name)."""
    if has_regions(dataset_json):
        raise UnsupportedDataset(
            f"{source}: region-based labels (regions_class_order / labels that list several values) are not "
            f"supported by RFMedSAM 2, which refines one softmax class per label; give each structure its own "
            f"label value, or train this dataset with stock nnU-Net")
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if channels > SAM2_INPUT_CHANNELS:
        raise UnsupportedDataset(
            f"{source}: {channels} image channels; SAM 2 takes at most {SAM2_INPUT_CHANNELS} (RGB) and RFMedSAM 2 "
            f"drops none silently: keep the {SAM2_INPUT_CHANNELS} most informative channels in the raw dataset")


def check_raw_dataset_supported(dataset_json_file: str | Path) -> None:
    path = Path(dataset_json_file)
    check_dataset_supported(json.loads(path.read_text()), str(path))


class SupportedDatasetMixin:
    """Put before nnUNetTrainer: the trainer refuses an unsupported dataset before it builds anything."""

    # nnU-Net saves this signature's arguments in checkpoints (init_args) by introspection: keep it explicit
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_dataset_supported(dataset_json, f"dataset.json of {plans.get('dataset_name', 'this dataset')}")
        super().__init__(plans, configuration, fold, dataset_json, device)
