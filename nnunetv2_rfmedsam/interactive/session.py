"""InteractiveSession: a trained RFMedSAM 2 refiner driven by a person's prompts (SAM-Med2D / SAM-Med3D style).

    session = InteractiveSession.from_model_folder(
        "$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerRFMedSAM2__nnUNetRFMedSAM2Plans__3d_rfmedsam2", "all")
    session.set_image("hippocampus_001_0000.nii.gz")
    session.add_box(1, 12, (20, 10, 35, 30))          # class 1 on slice 12
    session.propagate()                                # every slice, through SAM 2's memory
    session.add_points(1, 15, [(25, 18, 1), (30, 22, 0)])  # correct slice 15: a positive and a negative click
    session.propagate()                                # recomputes only what the clicks change
    session.save("hippocampus_001.nii.gz")

Coordinates are voxel indices of the ORIGINAL image in SimpleITK's GetArrayFromImage order: the slice (first
axis), then y, then x. A box is (y0, x0, y1, x1), its corners, with y0 < y1 and x0 < x1; a point is (y, x, label)
with label 1 (positive) or 0 (negative). volume.py maps them onto the network grid (nnU-Net's preprocessing);
propagation.py carries each class through the slices.

Corrections: a prompt on a slice whose class already has a result makes the slice's latest result its mask
prompt, as SAM 2's video predictor feeds a corrected frame's previous logits to the decoder (and as the refiner's
second pass is prompted by its first); a box given earlier on the slice stays and clicks accumulate. A slice whose
only prompts are negative clicks no longer has the class (see propagation.py).

A class started from a mask (`add_mask`: stage 1's prediction, or the automatic result a person corrects) is
computed on the slices the mask covered as the refiner computes the cascade (model/network.py): the mask's logit
moved towards SAM 2's by the model's trained gate of its last pass (the pass trained on clicks),
`start + gate * (sam - start)`. A refiner whose gates are still closed (an untrained one, or one trained briefly
on random SAM 2 weights) thus keeps the mask; one whose training opened them follows SAM 2. A class started from
boxes or clicks alone, or a plain refiner (no gates), has SAM 2's logits.

What is computed when:
- `set_image`: nnU-Net's preprocessing, and SAM 2's image encoder once over all slices; these features stay
  cached until the next `set_image` (`reset` and `undo` keep them), so no prompt ever re-encodes the volume;
- `propagate`: for each class whose prompts changed, the slices propagation.py names (the forward slices from
  the first changed one, and the backward ones); other classes are reused as they are;
- `logits` and `label_map`: propagate first if prompts changed since; `label_map` maps the logits back to the
  original grid with nnU-Net's export.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_rfmedsam.interactive.errors import InteractiveError, PromptError
from nnunetv2_rfmedsam.interactive.propagation import SlicePrompt, Track, propagate_object
from nnunetv2_rfmedsam.interactive.volume import PreprocessedImage
from nnunetv2_rfmedsam.model.network import BACKGROUND_LOGIT, PROMPT_LOGIT, RFMedSAM2Network
from nnunetv2_rfmedsam.model.precision import sam2_precision
from nnunetv2_rfmedsam.model.prompts import MASK_PROMPT_STRIDE, boxes_from_masks, masks_to_prompt_logits
from nnunetv2_rfmedsam.model.refinement import ABSENT_LOGIT, SliceFeatures, encode_slices
from nnunetv2_rfmedsam.settings import NETWORK_CLASS
from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2

# a correction's mask prompt, the slice's previous logits, is clamped as SAM 2's video predictor clamps them
PREVIOUS_LOGITS_LIMIT = 32.0
# undo keeps the results (device tensors of every slice) of this many latest actions; older ones keep their prompts
UNDO_WITH_RESULTS = 4


@dataclass(frozen=True)
class _Action:
    """A prompt action and the state before it, for undo."""

    description: str
    prompts: dict[int, dict[int, SlicePrompt]]
    tracks: dict[int, Track] | None  # None: dropped from the history (UNDO_WITH_RESULTS)
    starts: dict[int, "_Start"]


@dataclass(frozen=True)
class _Start:
    """A class's start from mask prompts, on the network grid: the mask (D, H, W), and the slices (D,) it covers
    (every slice for a whole-volume mask, where the slices without the class start as background)."""

    mask: torch.Tensor
    covered: torch.Tensor

    def logits(self) -> torch.Tensor:
        return torch.where(self.mask, PROMPT_LOGIT, -PROMPT_LOGIT)


class InteractiveSession:
    def __init__(self, network: RFMedSAM2Network, plans_manager: PlansManager,
                 configuration_manager: ConfigurationManager, dataset_json: dict, device: str | torch.device = "cpu",
                 feature_budget_gb: float | None = None):
        """`feature_budget_gb`: a volume whose image features would take more of the device's memory than this
        keeps them in pinned host memory instead, each slice's copied to the device as it is used (None: always on
        the device; at input 1024 a slice's features take 8 MiB in bfloat16)."""
        self.device = torch.device(device)
        self.feature_budget_gb = feature_budget_gb
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InteractiveError(f"device {device}: no CUDA device is available")
        self.network = network.to(self.device).eval()
        self.plans_manager, self.configuration_manager = plans_manager, configuration_manager
        self.dataset_json = dataset_json
        label_manager = plans_manager.get_label_manager(dataset_json)
        if label_manager.has_regions:
            raise InteractiveError("region-based models are not supported: prompts need one class per label")
        self.channel_of_label = {label: channel for channel, label in enumerate(label_manager.all_labels)}
        self.class_names = {int(v): k for k, v in dataset_json["labels"].items()
                            if int(v) in label_manager.foreground_labels}
        self.image: PreprocessedImage | None = None
        self.features: SliceFeatures | None = None
        self._prompts: dict[int, dict[int, SlicePrompt]] = {}
        self._tracks: dict[int, Track] = {}
        self._starts: dict[int, _Start] = {}
        self._history: list[_Action] = []

    @classmethod
    def from_model_folder(cls, model_dir, fold, checkpoint_name: str = "checkpoint_final.pth",
                          device: str | torch.device = "cpu",
                          feature_budget_gb: float | None = None) -> "InteractiveSession":
        """A trained `3d_rfmedsam2` model folder (nnUNetTrainerRFMedSAM2__<plans>__3d_rfmedsam2) and fold."""
        model_dir = Path(model_dir)
        for name in ("dataset.json", "plans.json"):
            if not (model_dir / name).is_file():
                raise InteractiveError(f"model folder {model_dir}: no {name} (is it an nnU-Net model folder?)")
        checkpoint_path = model_dir / f"fold_{fold}" / checkpoint_name
        if not checkpoint_path.is_file():
            raise InteractiveError(f"model folder {model_dir}: no checkpoint {checkpoint_path}")
        dataset_json = load_json(str(model_dir / "dataset.json"))
        plans_manager = PlansManager(load_json(str(model_dir / "plans.json")))
        # nnU-Net checkpoints hold numpy values beside the weights (as nnU-Net's own predictor loads them)
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        configuration = checkpoint["init_args"]["configuration"]
        configuration_manager = plans_manager.get_configuration(configuration)
        if configuration_manager.network_arch_class_name != NETWORK_CLASS:
            raise InteractiveError(f"{checkpoint_path}: configuration {configuration!r} is not an RFMedSAM 2 refiner "
                                   f"(its network is {configuration_manager.network_arch_class_name})")
        label_manager = plans_manager.get_label_manager(dataset_json)
        network = nnUNetTrainerRFMedSAM2.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            label_manager.num_segmentation_heads, enable_deep_supervision=False)
        network.load_state_dict(checkpoint["network_weights"])
        return cls(network, plans_manager, configuration_manager, dataset_json, device, feature_budget_gb)

    # --- the image ---

    def set_image(self, image, spacing=None) -> None:
        """A path to a NIfTI (or any SimpleITK) image, a list of paths (one per channel), or an array (D, H, W)
        or (C, D, H, W) with its spacing in array axis order (default: the model's spacing). Clears prompts."""
        prepared = PreprocessedImage.prepare(image, spacing, self.plans_manager, self.configuration_manager,
                                             self.dataset_json)
        # the previous image's features go before the new ones come
        self.image, self.features = prepared, None
        self.reset()
        try:
            with torch.inference_mode(), self._precision():
                self.features = self._encode(prepared.data.to(self.device))
        except BaseException:
            self.image = None
            raise

    def _encode(self, data: torch.Tensor) -> SliceFeatures:
        """SAM 2's image features of every slice, encoded a training patch's worth of slices at a time into one
        buffer per level (no concatenation, which would hold them twice), in the precision SAM 2 computes in; the
        position encodings once (`SliceFeatures.shared_positions`)."""
        chunk, depth = self.network.settings.slices_per_patch, data.shape[1]
        features, positions, sizes, offloaded = None, None, None, False
        for start in range(0, depth, chunk):
            part = encode_slices(self.network.sam, self.network.sam_frames(data[None, :, start:start + chunk]),
                                 data[:, start:start + chunk].shape[1])
            if features is None:
                offloaded = self._over_feature_budget(depth * sum(x.shape[0] * x.shape[2] * x.element_size()
                                                                  for x in part.vision_feats))
                home = torch.device("cpu") if offloaded else self.device
                pinned = offloaded and self.device.type == "cuda"  # pinned: the copies to the device run async
                features = [torch.empty((x.shape[0], depth, x.shape[2]), dtype=x.dtype, device=home, pin_memory=pinned)
                            for x in part.vision_feats]
                positions, sizes = [p[:, :1].clone() for p in part.vision_pos_embeds], part.feat_sizes
            for buffer, level in zip(features, part.vision_feats):
                buffer[:, start:start + level.shape[1]].copy_(level)
        return SliceFeatures(vision_feats=features, vision_pos_embeds=positions, feat_sizes=sizes, num_slices=depth,
                             shared_positions=True, device=self.device if offloaded else None)

    def _over_feature_budget(self, volume_bytes: int) -> bool:
        """Whether a volume's image features would take more than `feature_budget_gb` of the device's memory (then
        they are held in host memory)."""
        return self.feature_budget_gb is not None and volume_bytes > self.feature_budget_gb * 2 ** 30

    def _precision(self):
        # as RFMedSAM2Network.forward
        return sam2_precision(self.device)

    # --- prompts ---

    def add_points(self, class_id: int, slice_index: int, points) -> None:
        """Clicks (y, x, label) on a slice; label 1 positive, 0 negative."""
        self.add_prompt(class_id, slice_index, points=points)

    def add_box(self, class_id: int, slice_index: int, box) -> None:
        """A box (y0, x0, y1, x1) on a slice."""
        self.add_prompt(class_id, slice_index, box=box)

    def add_prompt(self, class_id: int, slice_index: int, box=None, points=None, replace: bool = False) -> None:
        """A box and/or clicks on one slice, as one action (undone together). `replace`: the class's earlier
        prompts on the slice (e.g. from `add_mask`) and its result there are dropped instead of kept, so that
        negative clicks alone remove the class from the slice (see propagation.py)."""
        context = f"prompt {len(self._history) + 1} (class {class_id}, slice {slice_index})"
        self._check_class(class_id, context)
        self._check_slice(slice_index, context)
        if box is None and not points:
            raise PromptError(f"{context}: give a box or at least one point")
        new_boxes = {} if box is None else dict([self._grid_box(box, slice_index, context)])
        new_points: dict[int, list] = {}
        for point in points or ():
            d, grid_point = self._grid_point(point, slice_index, context)
            new_points.setdefault(d, []).append(grid_point)
        self._record(context)
        prompts = self._prompts.setdefault(class_id, {})
        track = self._tracks.get(class_id)
        for d in new_boxes.keys() | new_points.keys():
            if replace:
                prompts[d] = SlicePrompt(box=new_boxes.get(d), points=tuple(new_points.get(d, ())))
                self._uncover_start(class_id, d)
                continue
            old = prompts.get(d, SlicePrompt())
            mask_logits = old.mask_logits if track is None else track.results[d].low_res.clamp(
                -PREVIOUS_LOGITS_LIMIT, PREVIOUS_LOGITS_LIMIT)
            prompts[d] = SlicePrompt(box=new_boxes.get(d, old.box), points=old.points + tuple(new_points.get(d, ())),
                                     mask_logits=mask_logits)

    def add_mask(self, class_id: int, mask, slice_index: int | None = None) -> None:
        """A mask prompt: a label map (D, H, W) of the whole image, whose voxels equal to `class_id` (or True, for
        a boolean mask) prompt the class on every slice where it has any, e.g. a stage-1 prediction; or a single
        slice (H, W) with `slice_index`. Each such slice gets the mask's box and the mask as prompts."""
        context = (f"prompt {len(self._history) + 1} (class {class_id}, "
                   + ("mask)" if slice_index is None else f"slice {slice_index}, mask)"))
        self._check_class(class_id, context)
        if slice_index is not None:
            self._check_slice(slice_index, context)
        mask = np.asarray(mask)
        expected = self.image.original_shape if slice_index is None else self.image.original_shape[1:]
        if mask.shape != expected:
            raise PromptError(f"{context}: mask of shape {mask.shape} does not match the image's {expected}")
        foreground = mask if mask.dtype == bool else mask == class_id
        if not foreground.any():
            raise PromptError(f"{context}: the mask has no voxel of class {class_id}")
        volume = np.zeros(self.image.original_shape, dtype=bool)
        volume[slice(None) if slice_index is None else slice_index] = foreground
        grid = torch.from_numpy(self.image.mask_to_network_grid(volume))
        boxes, present = boxes_from_masks(grid)
        if not present.any():
            raise PromptError(f"{context}: the mask lies in the zero-valued border that nnU-Net crops away")
        logits = masks_to_prompt_logits(grid, self.network.settings.image_size // MASK_PROMPT_STRIDE)
        self._record(context)
        prompts = self._prompts.setdefault(class_id, {})
        for d in torch.nonzero(present).flatten().tolist():
            old = prompts.get(d, SlicePrompt())
            prompts[d] = SlicePrompt(box=tuple(boxes[d].tolist()), points=old.points, mask_logits=logits[d])
        covered = torch.ones_like(present) if slice_index is None else present
        start = self._starts.get(class_id)
        if start is not None:
            grid = torch.where(covered[:, None, None], grid, start.mask)
            covered = covered | start.covered
        self._starts[class_id] = _Start(mask=grid, covered=covered)

    def _uncover_start(self, class_id: int, d: int) -> None:
        start = self._starts.get(class_id)
        if start is not None and start.covered[d]:
            covered = start.covered.clone()
            covered[d] = False
            self._starts[class_id] = _Start(mask=start.mask, covered=covered)

    def _record(self, description: str) -> None:
        self._history.append(_Action(description, {c: dict(p) for c, p in self._prompts.items()},
                                     dict(self._tracks), dict(self._starts)))
        # older actions keep their prompts only: their results (every slice's logits and memory, on the device)
        # are recomputed if undo goes back to them
        for old in range(max(0, len(self._history) - UNDO_WITH_RESULTS - 1), len(self._history) - UNDO_WITH_RESULTS):
            self._history[old] = dataclasses.replace(self._history[old], tracks=None)

    # --- results ---

    def propagate(self) -> dict[int, tuple[int, ...]]:
        """Segment every slice for every prompted class; returns, per class, the network-grid slices computed
        (empty where nothing had changed)."""
        self._check_image("propagate")
        computed = {}
        with torch.inference_mode(), self._precision():
            for class_id, prompts in self._prompts.items():
                previous = self._tracks.get(class_id)
                track = propagate_object(self.network.sam, self.features, prompts, self.image.grid_shape[1:],
                                         previous)
                self._tracks[class_id] = track
                computed[class_id] = () if track is previous else track.computed
        return computed

    def logits(self, classes=None) -> torch.Tensor:
        """The network's logits (K + 1, D, H, W) on the network grid (see volume.py), as the refiner gives them:
        a constant background logit, then one logit per class (ABSENT_LOGIT for a class without prompts, and for
        classes not in `classes` when given). Propagates first if prompts changed since the last propagation."""
        self._check_image("logits")
        if not all(self._is_current(c) for c in self._prompts):
            self.propagate()
        grid = self.image.grid_shape
        logits = torch.full((len(self.channel_of_label), *grid), ABSENT_LOGIT)
        logits[self.channel_of_label[0]] = BACKGROUND_LOGIT
        for class_id, track in self._tracks.items():
            if classes is None or class_id in classes:
                logits[self.channel_of_label[class_id]] = self._from_start(class_id, track.logits(grid))
        return logits

    def _from_start(self, class_id: int, sam_logits: torch.Tensor) -> torch.Tensor:
        """SAM 2's logits of a class, gated with its start where a mask prompt started it (module docstring)."""
        start, gates = self._starts.get(class_id), self.network.prompt_gates
        if start is None or gates is None:
            return sam_logits
        gate = gates[-1, self.channel_of_label[class_id] - 1].detach().float().cpu()
        prompt = start.logits()
        return torch.where(start.covered[:, None, None], prompt + gate * (sam_logits - prompt), sam_logits)

    def label_map(self) -> np.ndarray:
        """The segmentation (D, H, W) on the original image grid, as integer labels (0 background)."""
        self._check_image("label_map")
        logits = self.logits()
        return self.image.label_map(logits)

    def class_mask(self, class_id: int) -> np.ndarray:
        """Where the class alone is segmented (D, H, W) on the original image grid, as if it were the only class
        prompted (no other class competes for its voxels); all False for a class without prompts."""
        self._check_class(class_id, "class_mask")
        if class_id not in self._prompts:
            return np.zeros(self.image.original_shape, dtype=bool)
        return self.image.label_map(self.logits(classes={class_id})) == class_id

    def _is_current(self, class_id: int) -> bool:
        # slice prompts compare by identity (see propagation.py)
        track = self._tracks.get(class_id)
        return track is not None and track.prompts == self._prompts[class_id]

    def undo(self) -> str:
        """Remove the last prompt action and restore the results from before it; returns its description."""
        if not self._history:
            raise InteractiveError("nothing to undo")
        action = self._history.pop()
        self._prompts, self._tracks, self._starts = action.prompts, action.tracks or {}, action.starts
        if action.tracks is None and self._prompts:
            self.propagate()  # the same results again: the next correction's mask prompts are read from them
        return action.description

    def reset(self) -> None:
        """Clear prompts, results and history; the image and its features stay."""
        self._prompts, self._tracks, self._starts, self._history = {}, {}, {}, []

    def save(self, path: str | os.PathLike) -> Path:
        """Write the label map with the input image's geometry (atomically)."""
        self._check_image("save")
        return self.image.write(self.label_map(), path)

    # --- checks ---

    def _check_image(self, request: str) -> None:
        if self.image is None:
            raise InteractiveError(f"{request}: no image; call set_image first")

    def _check_class(self, class_id, context: str) -> None:
        if self.image is None:
            raise PromptError(f"{context}: no image; call set_image first")
        if isinstance(class_id, bool) or class_id not in self.class_names:
            known = ", ".join(f"{c} ({name})" for c, name in sorted(self.class_names.items()))
            raise PromptError(f"{context}: class {class_id!r} is not a class of this model; classes: {known}")

    def _check_slice(self, slice_index, context: str) -> None:
        depth = self.image.original_shape[0]
        if not _is_integer(slice_index) or not 0 <= slice_index < depth:
            raise PromptError(f"{context}: slice {slice_index!r} is beyond the volume of {depth} slices "
                              f"(0 to {depth - 1})")

    def _grid_point(self, point, slice_index: int, context: str) -> tuple[int, tuple[float, float, int]]:
        """A click (y, x, label) -> (network slice, (x, y, label) on its grid)."""
        if len(point) != 3 or not all(_is_number(v) for v in point):
            raise PromptError(f"{context}: point {tuple(point)!r} is not (y, x, label)")
        y, x, label = point
        if label not in (0, 1):
            raise PromptError(f"{context}: point {_show(point)} has label {label!r}; use 1 (positive) or 0 (negative)")
        height, width = self.image.original_shape[1:]
        if not (0 <= y <= height - 1 and 0 <= x <= width - 1):
            raise PromptError(f"{context}: point {_show((y, x))} is outside the image of size {height} x {width}")
        grid = self.image.to_network_grid((slice_index, y, x))
        if grid is None:
            raise PromptError(f"{context}: point {_show((y, x))} lies in the zero-valued border that nnU-Net "
                              f"crops away")
        d = int(np.clip(round(grid[0]), 0, self.image.grid_shape[0] - 1))
        return d, (float(grid[2]), float(grid[1]), int(label))

    def _grid_box(self, box, slice_index: int, context: str) -> tuple[int, tuple[float, float, float, float]]:
        """A box (y0, x0, y1, x1) -> (network slice, (x0, y0, x1, y1) on its grid)."""
        if len(box) != 4 or not all(_is_number(v) for v in box):
            raise PromptError(f"{context}: box {tuple(box)!r} is not (y0, x0, y1, x1)")
        y0, x0, y1, x1 = box
        height, width = self.image.original_shape[1:]
        if not all(0 <= v <= height - 1 for v in (y0, y1)) or not all(0 <= v <= width - 1 for v in (x0, x1)):
            raise PromptError(f"{context}: box {_show(box)} is outside the image of size {height} x {width}")
        if y1 < y0 or x1 < x0:
            raise PromptError(f"{context}: box {_show(box)} is inverted; give (y0, x0, y1, x1) with y0 < y1 and "
                              f"x0 < x1")
        if y1 == y0 or x1 == x0:
            raise PromptError(f"{context}: box {_show(box)} has zero area")
        if not self.image.slice_axis_kept:
            raise PromptError(f"{context}: this model runs along image axis {self.plans_manager.transpose_forward[0]}, "
                              f"not along the slices of axis 0: give points instead of a box")
        kept = self.image.kept_region()
        corners = [self.image.to_network_grid((slice_index, *np.clip((y, x), kept[1:, 0], kept[1:, 1])))
                   for y, x in ((y0, x0), (y1, x1))]
        if corners[0] is None:
            raise PromptError(f"{context}: slice {slice_index} lies in the zero-valued border that nnU-Net crops away")
        (d, h0, w0), (_, h1, w1) = corners
        d = int(np.clip(round(d), 0, self.image.grid_shape[0] - 1))
        return d, (min(w0, w1), min(h0, h1), max(w0, w1), max(h0, h1))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _show(values) -> str:
    return "(" + ", ".join(f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in values) + ")"
