"""The plugin's reader: medical images through SimpleITK, so that the viewer keeps their geometry.

The layer's data is SimpleITK's array (slice, y, x), as nnU-Net reads it; its scale is the voxel spacing and its
translate the origin (axis order reversed to match), and its metadata keeps the file's path, which the dock
widget predicts from and saves beside.
"""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
SOURCE_PATH = "rfmedsam2_source_path"


def get_reader(path):
    """napari's reader hook: a function reading `path` if this plugin reads it, else None."""
    if isinstance(path, list):
        path = path[0] if len(path) == 1 else None
    if not isinstance(path, str) or not path.lower().endswith(SUFFIXES):
        return None
    return read_image_layer


def read_image_layer(path):
    """[(data, layer settings, "image")] for a 3-D image file."""
    path = str(path[0] if isinstance(path, list) else path)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise ValueError(f"image {path}: SimpleITK cannot read it ({' '.join(str(error).split())[:200]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"image {path}: expected a 3-D single-channel image, got {image.GetDimension()}-D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
            break
    settings = {"name": name, "scale": tuple(image.GetSpacing()[::-1]), "translate": tuple(image.GetOrigin()[::-1]),
                "metadata": {SOURCE_PATH: str(Path(path).resolve())}}
    return [(sitk.GetArrayFromImage(image), settings, "image")]
