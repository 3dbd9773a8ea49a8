#!/usr/bin/env python3
"""Regenerate data/AbdomenCT_crop/ from the abdominal CT of ../shared/data/AbdomenCT_example.

The crop is the bounding box of every labelled organ, in the CT's own 3 mm voxels (nothing is resampled), so each
organ is whole and nnU-Net's foreground intensity statistics of the crop equal those of the full CT. The CT is
stored as int16: its Hounsfield units (-1207 to 3382) fit, and the file is smaller than with the source's int32.
Geometry (spacing, direction, the origin of the first cropped voxel) is kept.

    python3 scripts/make_ct_crop.py [--source DIR] [--target DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunetv2_rfmedsam.raw_dataset import (ABDOMEN_CT_FILES, SHARED_ABDOMEN_CT,  # noqa: E402
                                           VENDORED_ABDOMEN_CT)


def labels_bounding_box(labels: sitk.Image) -> tuple[list[int], list[int]]:
    """Start index and size, in SimpleITK's (x, y, z) order, of the box around every nonzero label."""
    foreground = np.argwhere(sitk.GetArrayViewFromImage(labels) > 0)
    if foreground.size == 0:
        raise ValueError("the label map has no foreground: nothing to crop to")
    start, stop = foreground.min(axis=0), foreground.max(axis=0) + 1
    return [int(v) for v in start[::-1]], [int(v) for v in (stop - start)[::-1]]


def as_int16(image: sitk.Image, name: str) -> sitk.Image:
    """The image cast to int16, refusing values that would not survive the cast."""
    values = sitk.GetArrayViewFromImage(image)
    info = np.iinfo(np.int16)
    if values.min() < info.min or values.max() > info.max:
        raise ValueError(f"{name}: values {values.min()}..{values.max()} do not fit int16")
    return sitk.Cast(image, sitk.sitkInt16)


def make_crop(source: Path, target: Path) -> tuple[list[int], list[int]]:
    """Write the crop of `source` (ct.nii.gz, labels_btcv13_pseudo.nii.gz) into `target`; return its box."""
    ct_name, labels_name = ABDOMEN_CT_FILES
    ct, labels = sitk.ReadImage(str(source / ct_name)), sitk.ReadImage(str(source / labels_name))
    start, size = labels_bounding_box(labels)
    target.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(as_int16(sitk.RegionOfInterest(ct, size, start), str(source / ct_name)),
                    str(target / ct_name), True)
    sitk.WriteImage(sitk.RegionOfInterest(labels, size, start), str(target / labels_name), True)
    return start, size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SHARED_ABDOMEN_CT)
    parser.add_argument("--target", type=Path, default=VENDORED_ABDOMEN_CT)
    args = parser.parse_args(argv)
    start, size = make_crop(args.source, args.target)
    print(f"cropped {args.source} at index {start}, size {size} (x, y, z) into {args.target}")


if __name__ == "__main__":
    main()
