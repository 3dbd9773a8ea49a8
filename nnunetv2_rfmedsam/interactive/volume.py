"""An image as the interactive session sees it: read, preprocessed by nnU-Net, and mapped back.

Coordinates. Users give voxel indices (slice, y, x) of the ORIGINAL image in SimpleITK's GetArrayFromImage
order. nnU-Net's preprocessor (`DefaultPreprocessor.run_case_npy`, with the model's plans) transposes the axes
(`transpose_forward`), crops to the nonzero region and resamples to the configuration's spacing; the session
then pads each slice to the configuration's in-plane patch size, as nnU-Net's predictor pads its input, so that
SAM 2 sees slices at the scale the refiner was trained at. The network grid is that padded array: its first
axis is the slice axis the refiner runs along. `to_network_grid` maps a voxel through those steps: transpose,
subtract the crop's start, map voxel centres to voxel centres ((i + 0.5) * new / old - 0.5), add the padding.
Results go back with nnU-Net's `convert_predicted_logits_to_segmentation_with_correct_shape` (the
configuration's resampling of logits, uncropping, transposing back).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_rfmedsam.atomic_files import replacing
from nnunetv2_rfmedsam.interactive.errors import InteractiveError
from nnunetv2_rfmedsam.nifti_integrity import DamagedNifti, is_nifti, stored_voxels


def read_image(image, spacing=None) -> tuple[np.ndarray, tuple[float, ...], sitk.Image | None]:
    """(channels (C, D, H, W) float32, spacing in array axis order, the first channel's image for its geometry).

    `image`: a path (or a list of paths, one per channel) to a file SimpleITK reads, or an array (D, H, W) or
    (C, D, H, W) with `spacing` in array axis order (None: the caller decides)."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4):
            raise InteractiveError(f"image array: expected (D, H, W) or (C, D, H, W), got shape {image.shape}")
        channels = image[None] if image.ndim == 3 else image
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise InteractiveError(f"spacing {tuple(spacing)}: give three positive numbers in array axis order")
        channels = channels.astype(np.float32)
        refuse_non_finite(channels, "image array")
        return channels, None if spacing is None else tuple(float(s) for s in spacing), None
    paths = [Path(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
    images = []
    for path in paths:
        if not path.is_file():
            raise InteractiveError(f"image {path}: no such file")
        refuse_damaged_nifti(path)
        try:
            images.append(sitk.ReadImage(str(path)))
        except RuntimeError as error:
            raise InteractiveError(
                f"image {path}: SimpleITK cannot read it ({' '.join(str(error).split())[:200]})") from None
        if images[-1].GetDimension() != 3:
            raise InteractiveError(f"image {path}: expected a 3-D image, got {images[-1].GetDimension()}-D")
    arrays = [sitk.GetArrayFromImage(i).astype(np.float32) for i in images]
    for path, array in zip(paths, arrays):
        refuse_non_finite(array, f"image {path}")
    if len({a.shape for a in arrays}) > 1:
        raise InteractiveError(f"images {', '.join(map(str, paths))}: channels differ in size")
    return np.stack(arrays), tuple(float(s) for s in images[0].GetSpacing()[::-1]), images[0]


def refuse_damaged_nifti(path: Path) -> None:
    """InteractiveError naming `path` if it is a NIfTI file cut short, with a corrupt gzip stream, or with NaN or
    infinite voxels as stored: SimpleITK reads such a file without a word (a cut one as an image of mostly zeros,
    NaN and infinity as 0; nifti_integrity.py). Other formats: SimpleITK raises on a cut file and keeps NaN."""
    if not is_nifti(str(path)):
        return
    try:
        voxels = stored_voxels(str(path))
    except DamagedNifti as error:
        raise InteractiveError(f"image {path}: {error}") from None
    refuse_non_finite(voxels, f"image {path}")


def refuse_non_finite(values: np.ndarray, name: str) -> None:
    """InteractiveError naming `name` if `values` hold NaN or infinite voxels: nnU-Net's normalisation would
    spread them over the whole image (a z-score with a NaN mean) and SAM 2 would see nothing else."""
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InteractiveError(f"{name}: {bad} of {values.size} voxels are not finite (NaN or infinite); the model "
                               f"needs finite intensities")


@dataclass
class PreprocessedImage:
    """An image on the network grid (see the module docstring) and what maps results back."""

    data: torch.Tensor                 # (C, D, H, W) on the network grid
    properties: dict                   # nnU-Net's properties of the case (spacing, crop, shapes)
    original: np.ndarray               # (C, D0, H0, W0) as read, for mapping masks the way nnU-Net does
    reference: sitk.Image | None       # geometry for writing results (None for an array)
    content: tuple[slice, ...]         # where the preprocessed image lies in the padded (D, H, W)
    plans_manager: PlansManager
    configuration_manager: ConfigurationManager
    dataset_json: dict

    @classmethod
    def prepare(cls, image, spacing, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                dataset_json: dict) -> "PreprocessedImage":
        """Read and preprocess `image` (see `read_image`). An array without spacing is taken to have the
        configuration's spacing (it is then not resampled)."""
        original, spacing, reference = read_image(image, spacing)
        expected = len(dataset_json["channel_names"])
        if original.shape[0] != expected:
            raise InteractiveError(f"image has {original.shape[0]} channel(s); the model takes {expected} "
                                   f"({', '.join(dataset_json['channel_names'].values())})")
        if spacing is None:
            spacing = tuple(configuration_manager.spacing[i] for i in plans_manager.transpose_backward)
        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(original, None, {"spacing": list(spacing)}, plans_manager,
                                                        configuration_manager, dataset_json)
        padded, slicer = pad_nd_image(torch.from_numpy(data), configuration_manager.patch_size[1:], "constant",
                                      {"value": 0}, True)
        return cls(padded, properties, original, reference, tuple(slicer[1:]), plans_manager, configuration_manager,
                   dataset_json)

    @property
    def original_shape(self) -> tuple[int, int, int]:
        return tuple(self.original.shape[1:])

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])

    @property
    def slice_axis_kept(self) -> bool:
        """Whether the network's slices are the original image's slices (nnU-Net may transpose the axes)."""
        return self.plans_manager.transpose_forward[0] == 0

    def kept_region(self) -> np.ndarray:
        """(3, 2): the first and last voxel index, per original axis, of the region nnU-Net keeps (its crop to the
        image's nonzero region)."""
        bbox = np.array(self.properties["bbox_used_for_cropping"])
        return np.stack([bbox[self.plans_manager.transpose_backward, 0],
                         bbox[self.plans_manager.transpose_backward, 1] - 1], axis=1)

    def to_network_grid(self, voxel) -> np.ndarray | None:
        """A voxel (slice, y, x) of the original image -> continuous (d, h, w) on the network grid, or None if
        it lies outside the region nnU-Net keeps (its crop to the image's nonzero region)."""
        transposed = np.array([voxel[i] for i in self.plans_manager.transpose_forward], dtype=float)
        bbox = np.array(self.properties["bbox_used_for_cropping"], dtype=float)
        if np.any(transposed < bbox[:, 0]) or np.any(transposed > bbox[:, 1] - 1):
            return None
        cropped = np.array(self.properties["shape_after_cropping_and_before_resampling"], dtype=float)
        resampled = np.array([s.stop - s.start for s in self.content], dtype=float)
        start = np.array([s.start for s in self.content], dtype=float)
        return (transposed - bbox[:, 0] + 0.5) * resampled / cropped - 0.5 + start

    def mask_to_network_grid(self, mask: np.ndarray) -> np.ndarray:
        """A boolean mask (D0, H0, W0) on the original grid -> (D, H, W) on the network grid, preprocessed as
        nnU-Net preprocesses segmentations (its `resampling_fn_seg`)."""
        _, seg, _ = self.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
            self.original, mask[None].astype(np.int16), {"spacing": list(self.properties["spacing"])},
            self.plans_manager, self.configuration_manager, self.dataset_json)
        padded = np.zeros(self.grid_shape, dtype=bool)
        padded[self.content] = seg[0] > 0
        return padded

    def label_map(self, logits: torch.Tensor) -> np.ndarray:
        """Logits (K + 1, D, H, W) on the network grid -> label map (D0, H0, W0) on the original grid."""
        label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits[(slice(None), *self.content)].float().cpu(), self.plans_manager, self.configuration_manager,
            label_manager, self.properties, num_threads_torch=torch.get_num_threads())

    def write(self, label_map: np.ndarray, path: str | os.PathLike) -> Path:
        """Write `label_map` (D0, H0, W0) with the input image's geometry, atomically."""
        spacing = None if self.reference is not None else self.properties["spacing"]
        return write_label_map(label_map, path, self.reference, spacing)


def write_label_map(label_map: np.ndarray, path: str | os.PathLike, reference: sitk.Image | None = None,
                    spacing=None) -> Path:
    """Write a label map (D, H, W) with `reference`'s geometry (or `spacing` in array axis order), atomically
    (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    if reference is not None and tuple(reference.GetSize()[::-1]) != label_map.shape:
        raise InteractiveError(f"{path}: label map of shape {label_map.shape} does not match its image's "
                               f"{tuple(reference.GetSize()[::-1])}")
    image = sitk.GetImageFromArray(label_map.astype(np.uint8 if label_map.max() < 256 else np.uint16))
    if reference is not None:
        image.CopyInformation(reference)
    elif spacing is not None:
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    with replacing(path) as temporary:  # keeps the name's ending, from which SimpleITK picks the format
        sitk.WriteImage(image, str(temporary), useCompression=True)
    return path
