"""One refinement pass: the slices of a patch run through SAM 2 as the frames of a video.

Every (batch item, class) pair is one SAM 2 object; the N = B * K objects of a slice are batched in SAM 2's
batch dimension (object n is batch item n // K, class n % K). The image encoder runs once per slice
(`encode_slices`), and its features serve every object and every pass; memory attention runs once per slice and
object too: a later refinement pass corrects the slice on the features pass 1 conditioned on memory
(`SliceWalk`), and the final pass's result is the slice's memory.

With memory, slice 0 is the conditioning frame and each later slice is conditioned, through memory attention,
on slice 0's memory and on the memories and object pointers of the slices before it, the way SAM 2's video
predictor tracks; a later slice with prompts also gets them, as the video predictor treats a correction on a
tracked frame (`Departures.prompted_slices_use_memory`; departures.py names every way the refiner differs
from SAM 2). Without
memory (an ablation) every slice is processed like an initial frame: `no_mem_embed` is added to its features
and no memories are written.

`track_slice` runs one slice for every object; the interactive session (interactive/propagation.py) calls it
too, one object at a time, so training, cascade prediction and interaction run one code path. SAM 2 takes
one prompt layout per call, so objects whose prompts differ in kind (number of points, mask or not) run as
separate groups, each with the memories of its own objects; in the common case every object of a slice has a
box and a mask and the slice is one call.

Object presence (`Departures.presence_from_prompts`, on by default): an object with prompts on a slice is there
exactly when its prompts say so (`ObjectPrompts.present`: a box, or a positive click). An object without a box
or a positive click is absent: its output is the constant ABSENT_LOGIT, and its memory for later slices says
"absent" exactly as SAM 2 writes an object it scores as not visible (mask logits NO_OBJ_SCORE, a negative object
score, so the memory encoder adds `no_obj_embed_spatial`, and `no_obj_ptr` as its object pointer). Slices left
without prompts (`ObjectPrompts.unprompted`: in training, see `drop_training_prompts`) are segmented as SAM 2's
video predictor segments frames without prompts: from memory alone, SAM 2's object-score head deciding whether
each object is there. With the departure off, the head decides on every slice and memories are SAM 2's own.

The object-score logits of every slice are returned as well: training gives them a presence loss, as Meta trains
the head, so that slices left to memory are judged by a head that has seen this data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base

from nnunetv2_rfmedsam.model.departures import REFINER, Departures, sam2_call_flags
from nnunetv2_rfmedsam.model.device_constants import device_constant
from nnunetv2_rfmedsam.model.prompts import NOT_A_POINT, ObjectPrompts

# the logit of a class on a slice where it is absent: background after nnU-Net's softmax, yet finite
ABSENT_LOGIT = -20.0
# object-score logits written into memory for present / absent objects (the values SAM 2 uses for masks
# given as output, `SAM2Base._use_mask_as_output`)
PRESENT_SCORE, ABSENT_SCORE = 10.0, -10.0
MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc", "obj_ptr")
# SAM2VideoPredictor keeps memories in bfloat16 (`_run_single_frame_inference`): the same values as it reads them,
# half the memory; training keeps float32, as Meta's training does
EVALUATION_MEMORY_DTYPE = torch.bfloat16


@dataclass
class SliceFeatures:
    """SAM 2 image features of every slice of B patches, flattened as SAM 2 keeps them: per feature level
    (H_l * W_l, B * D, C_l), image b * D + d being slice d of patch b.

    `shared_positions`: the position encodings are held for one image (H_l * W_l, 1, C_l) and serve every slice.
    They depend on the feature grid alone (sam2's PositionEmbeddingSine repeats one encoding over the batch), and at
    input 1024 they are four fifths of a slice's features: a session keeping a volume's features holds them once.

    `device`: where SAM 2 computes, if the image features are held elsewhere (a session's features offloaded to
    pinned host memory): one image's features are then copied there as a slice is used."""

    vision_feats: list[torch.Tensor]
    vision_pos_embeds: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]
    num_slices: int
    shared_positions: bool = False
    device: torch.device | None = None

    @property
    def compute_device(self) -> torch.device:
        return self.device if self.device is not None else self.vision_feats[0].device

    def bytes_per_slice(self) -> int:
        """Bytes held per slice (the shared position encodings apart)."""
        held = self.vision_feats + ([] if self.shared_positions else self.vision_pos_embeds)
        return sum(x.numel() * x.element_size() for x in held) // (self.batch_size * self.num_slices)

    @property
    def batch_size(self) -> int:
        return self.vision_feats[0].shape[1] // self.num_slices

    def image_of(self, num_objects: int) -> torch.Tensor:
        """(N,) the batch item each of N objects belongs to (object n is batch item n // K)."""
        return torch.arange(self.batch_size, device=self.vision_feats[0].device).repeat_interleave(
            num_objects // self.batch_size)

    def for_objects(self, slice_index: int, num_objects: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The features of one slice, repeated for each of the N objects (N a multiple of B)."""
        if self.batch_size == 1:
            # one image for every object (prediction): views, as SAM2VideoPredictor expands its cached features
            def pick(x, index=slice_index):
                image = x[:, index:index + 1].to(self.compute_device, non_blocking=True)
                return image.expand(-1, num_objects, -1)
            if self.shared_positions:
                return [pick(x) for x in self.vision_feats], [pick(x, 0) for x in self.vision_pos_embeds]
        else:
            images = self.image_of(num_objects) * self.num_slices + slice_index

            def pick(x):
                return x[:, images]
        return [pick(x) for x in self.vision_feats], [pick(x) for x in self.vision_pos_embeds]


def encode_slices(sam_model: SAM2Base, frames: torch.Tensor, num_slices: int) -> SliceFeatures:
    """Run SAM 2's image encoder once on frames (B * D, 3, S, S), ordered patch-major."""
    backbone_out = sam_model.forward_image(frames)
    _, vision_feats, vision_pos_embeds, feat_sizes = sam_model._prepare_backbone_features(backbone_out)
    return SliceFeatures(vision_feats, vision_pos_embeds, feat_sizes, num_slices)


class SliceLogits(NamedTuple):
    low_res: torch.Tensor        # (N, D, S/4, S/4) SAM 2's mask logits
    patch: torch.Tensor          # (N, D, H, W) the same, resized to the patch grid
    object_scores: torch.Tensor  # (N, D) SAM 2's object-score logits
    # with presence from prompts, low_res and patch are ABSENT_LOGIT where the object is absent


@dataclass
class SliceOutput:
    """One slice's result for N objects, and its memory for the slices after it."""

    low_res: torch.Tensor       # (N, 1, S/4, S/4)
    object_score: torch.Tensor  # (N, 1)
    present: torch.Tensor       # (N,) bool
    memory: dict | None         # SAM 2's frame output (MEMORY_KEYS), or None when no memory was written
    # the slice's image features conditioned on the memory bank (SAM 2's `pix_feat`, (N, C, h, w)) of the objects
    # that went through memory attention (`conditioned_objects`, known on the host), for a correction of the slice
    conditioned: torch.Tensor | None = None
    conditioned_objects: frozenset[int] = frozenset()

    def conditioned_for(self, group: "_Group") -> torch.Tensor | None:
        """The memory-conditioned features of a group's objects, if all of them have some."""
        if self.conditioned is None or not self.conditioned_objects.issuperset(group.members):
            return None
        return self.conditioned[group.objects]


def logits_to_grid(low_res: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """SAM 2's low-resolution mask logits (..., S/4, S/4) resized to a slice grid (..., H, W)."""
    lead = low_res.shape[:-2]
    flat = low_res.reshape(1, -1, *low_res.shape[-2:])
    # antialiasing matters where S/4 exceeds the patch grid (large S, small structures' patches)
    resized = F.interpolate(flat, size=tuple(grid_hw), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(*lead, *grid_hw)


class _Group(NamedTuple):
    objects: torch.Tensor         # indices into the N objects
    members: tuple[int, ...]      # the same, on the host
    point_inputs: dict | None
    mask_inputs: torch.Tensor | None
    prompted: bool


def object_index(members: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The indices `members` on `device`, copied there once per distinct set of objects (a volume's slices share a
    few sets)."""
    return device_constant(members, torch.long, device)


def _host_layout_of_slice(prompts: ObjectPrompts, s: int, labels: torch.Tensor,
                          departures: Departures) -> tuple[list[int], list[bool]]:
    """Each object's number of real points (`labels` (N, P) not NOT_A_POINT) and whether it is absent by its
    prompts on slice `s`: from the prompts' host layout, or read from the device in one transfer."""
    num_objects = prompts.present.shape[0]
    if prompts.layout is not None:
        points, absent = prompts.layout.points[:, s].tolist(), prompts.layout.absent[:, s].tolist()
    else:
        points, absent = torch.stack([(labels != NOT_A_POINT).sum(dim=1), ~prompts.present[:, s]]).tolist()
    return points, (absent if departures.presence_from_prompts else [False] * num_objects)


def _prompt_groups(prompts: ObjectPrompts, s: int, departures: Departures,
                   skip_absent: bool = False) -> tuple[list[_Group], list[int]]:
    """The objects of prompt slice `s` grouped by prompt layout, each with SAM 2's inputs holding only real
    points (a box's two corners first, then the clicks), as SAM2ImagePredictor and SAM2VideoPredictor give them;
    and the objects skipped.

    With presence from prompts, the outputs of objects absent by their prompts are replaced anyway: they ride
    along in the largest group, padded with NOT_A_POINT, rather than costing a SAM 2 call of their own (training
    needs their object scores for the presence loss), or with `skip_absent` they are skipped."""
    num_objects = prompts.present.shape[0]
    device = prompts.present.device
    if s in prompts.unprompted:
        every = tuple(range(num_objects))
        return [_Group(object_index(every, device), every, None, None, False)], []
    coords, labels = prompts.slice_points(s)
    # real points first, in their order: a stable sort on "is padding"
    order = torch.argsort((labels == NOT_A_POINT).to(torch.int8), dim=1, stable=True)
    coords = torch.gather(coords, 1, order[..., None].expand_as(coords))
    labels = torch.gather(labels, 1, order)
    counts, dont_care = _host_layout_of_slice(prompts, s, labels, departures)
    masks = prompts.mask_inputs(s)
    layouts: dict[tuple[int, bool], list[int]] = {}
    for n in range(num_objects):
        if not dont_care[n]:
            layouts.setdefault((counts[n], masks is not None and counts[n] > 0), []).append(n)
    riders = [n for n in range(num_objects) if dont_care[n]]
    if riders and not skip_absent:
        if layouts:
            max(layouts.values(), key=len).extend(riders)
        else:
            layouts[(max(counts), masks is not None)] = riders
        riders = []
    groups = []
    for (count, with_mask), members in layouts.items():
        members = tuple(sorted(members))
        index = object_index(members, device)
        point_inputs = None if count == 0 else {"point_coords": coords[index, :count].float(),
                                                "point_labels": labels[index, :count].to(torch.int32)}
        groups.append(_Group(index, members, point_inputs, masks[index] if with_mask else None,
                             point_inputs is not None or with_mask))
    return groups, riders


def _objects_of(memory_bank: dict, index: torch.Tensor) -> dict:
    """The memory bank of a subset of the objects (SAM 2 reads these keys of each earlier frame's output)."""
    return {kind: {t: {"maskmem_features": out["maskmem_features"][index],
                       "maskmem_pos_enc": [p[index] for p in out["maskmem_pos_enc"]],
                       "obj_ptr": out["obj_ptr"][index]} for t, out in frames.items()}
            for kind, frames in memory_bank.items()}


class MemoryBank:
    """The memories one walk through the slices has written, as SAM 2's `output_dict`
    ({"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}), holding only what SAM 2 can still
    read: every conditioning frame, and the non-conditioning frames within `reach` of the slice last written
    (SAM 2 reads the last `num_maskmem - 1` memories, strided in evaluation, and the last
    `max_obj_ptrs_in_encoder - 1` object pointers). A walk moves one slice at a time, so a volume's memory grows
    with that reach, not with its number of slices."""

    def __init__(self, sam_model: SAM2Base):
        stride = max(1, int(sam_model.memory_temporal_stride_for_eval))
        self.reach = max(sam_model.num_maskmem * stride, sam_model.max_obj_ptrs_in_encoder)
        self.output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}

    def add(self, frame: int, memory: dict, conditioning: bool) -> None:
        if conditioning:
            self.output_dict["cond_frame_outputs"][frame] = memory
            return
        frames = self.output_dict["non_cond_frame_outputs"]
        frames[frame] = memory
        for t in [t for t in frames if abs(t - frame) > self.reach]:
            del frames[t]


def _absent_memory(sam_model: SAM2Base, vision_feats: list[torch.Tensor], feat_sizes, count: int) -> dict:
    """The memory of `count` objects that SAM 2 would remember as absent on this slice (mask NO_OBJ_SCORE,
    negative object score, `no_obj_ptr`), all reading the same image (the features' first object). It depends on
    the image alone, so it is encoded once and shared."""
    image = [x[:, :1] for x in vision_feats]
    size = sam_model.image_size
    memory = {"obj_ptr": sam_model.no_obj_ptr.expand(count, -1)}
    sam_model._encode_memory_in_output(image, feat_sizes, None, True,
                                       torch.full((1, 1, size, size), NO_OBJ_SCORE, device=image[0].device),
                                       torch.full((1, 1), ABSENT_SCORE, device=image[0].device), memory)
    memory["maskmem_features"] = memory["maskmem_features"].expand(count, -1, -1, -1)
    memory["maskmem_pos_enc"] = [p.expand(count, -1, -1, -1) for p in memory["maskmem_pos_enc"]]
    return memory


def _high_res_features(vision_feats: list[torch.Tensor], feat_sizes) -> list[torch.Tensor] | None:
    """SAM 2's high-resolution feature maps for its mask decoder, (HW)BC -> BCHW, as `_track_step` makes them."""
    if len(vision_feats) == 1:
        return None
    return [x.permute(1, 2, 0).view(x.size(1), x.size(2), *size) for x, size in zip(vision_feats[:-1], feat_sizes[:-1])]


def _correct(sam_model: SAM2Base, conditioned: torch.Tensor, vision_feats: list[torch.Tensor], feat_sizes,
             point_inputs: dict | None, mask_inputs: torch.Tensor | None, is_init_cond_frame: bool) -> tuple:
    """SAM 2's heads on a slice's memory-conditioned features with new prompts: what `_track_step` computes on the
    same slice and memory bank, without running memory attention again (as Meta's training re-runs
    `_forward_sam_heads` for its correction clicks)."""
    return sam_model._forward_sam_heads(
        backbone_features=conditioned, point_inputs=point_inputs, mask_inputs=mask_inputs,
        high_res_features=_high_res_features(vision_feats, feat_sizes),
        multimask_output=sam_model._use_multimask(is_init_cond_frame, point_inputs))


def _remembered_present(present: torch.Tensor, prompted: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
    """(N,) which objects a slice's memory remembers as present: those present there, except that an object found
    from memory alone (not `prompted`) whose mask is empty is remembered as absent."""
    return present & (prompted | (low_res > 0).flatten(1).any(dim=1))


def track_slice(sam_model: SAM2Base, features: SliceFeatures, feature_slice: int, prompts: ObjectPrompts,
                prompt_slice: int, memory_bank: dict | MemoryBank, is_init_cond_frame: bool, reverse: bool = False,
                write_memory: bool = True, departures: Departures = REFINER, frame_index: int | None = None,
                num_frames: int | None = None, skip_absent: bool = False,
                correcting: SliceOutput | None = None) -> SliceOutput:
    """SAM 2's `_track_step` on one slice for all N objects of `prompts` (its slice `prompt_slice`), conditioned
    on `memory_bank` ({"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}), then the slice's
    memory (see the module docstring).

    The slice is image `feature_slice` of `features` and frame `frame_index` (default: the same) of a volume of
    `num_frames` slices (default: those of `features`). `skip_absent` (prediction, one image for all objects):
    objects absent by their prompts on this slice run no SAM 2 step at all; their output is ABSENT_LOGIT, their
    object score ABSENT_SCORE and their memory the one SAM 2 writes for an absent object, as with the step.

    `correcting`: an earlier output on this slice against the same memory bank (the refinement's pass before);
    objects it conditioned on memory reuse those features (`_correct`: the same result as the step, without
    memory attention), the others run the step."""
    frame_index = feature_slice if frame_index is None else frame_index
    num_frames = features.num_slices if num_frames is None else num_frames
    output_dict = getattr(memory_bank, "output_dict", memory_bank)
    num_objects = prompts.present.shape[0]
    vision_feats, vision_pos_embeds = features.for_objects(feature_slice, num_objects)
    groups, skipped = _prompt_groups(prompts, prompt_slice, departures,
                                     skip_absent=skip_absent and features.batch_size == 1)
    low_res, high_res, obj_ptr, object_score, conditioned = [], [], [], [], []
    for group in groups:
        whole = len(groups) == 1 and not skipped
        group_feats = vision_feats if whole else [x[:, group.objects] for x in vision_feats]
        with sam2_call_flags(sam_model, departures, group.prompted):
            # SAM 2 copies a mask prompt to the output without its heads when told to (SAM2_BEHAVIOUR)
            through_memory = group.mask_inputs is None or not sam_model.use_mask_input_as_output_without_sam
            earlier = correcting.conditioned_for(group) if correcting is not None and through_memory else None
            if earlier is not None:
                sam_outputs, pix_feat = _correct(sam_model, earlier, group_feats, features.feat_sizes,
                                                 group.point_inputs, group.mask_inputs, is_init_cond_frame), earlier
            else:
                _, sam_outputs, _, pix_feat = sam_model._track_step(
                    frame_idx=frame_index, is_init_cond_frame=is_init_cond_frame, current_vision_feats=group_feats,
                    current_vision_pos_embeds=vision_pos_embeds if whole else [x[:, group.objects]
                                                                               for x in vision_pos_embeds],
                    feat_sizes=features.feat_sizes, point_inputs=group.point_inputs, mask_inputs=group.mask_inputs,
                    output_dict=output_dict if whole else _objects_of(output_dict, group.objects),
                    num_frames=num_frames, track_in_reverse=reverse, prev_sam_mask_logits=None)
        for gathered, value in zip((low_res, high_res, obj_ptr, object_score), sam_outputs[3:]):
            gathered.append(value)
        conditioned.append(pix_feat if through_memory else None)
    device = vision_feats[0].device
    tracked = torch.cat([g.objects for g in groups]) if groups else torch.zeros(0, dtype=torch.long, device=device)
    quarter = sam_model.image_size // 4
    full_low_res = torch.full((num_objects, 1, quarter, quarter), ABSENT_LOGIT, device=device)
    full_score = torch.full((num_objects, 1), ABSENT_SCORE, device=device)
    present = torch.zeros(num_objects, dtype=torch.bool, device=device)
    memory = {} if write_memory else None
    kept_features, kept_objects = None, frozenset()
    if len(groups) == 1 and not skipped and conditioned[0] is not None:
        # the common case, one call for every object: its features are in object order already
        kept_features, kept_objects = conditioned[0], frozenset(range(num_objects))
    elif any(c is not None for c in conditioned):
        shape = next(c for c in conditioned if c is not None).shape[1:]
        kept_features = vision_feats[-1].new_zeros((num_objects, *shape))
        for group, features_of_group in zip(groups, conditioned):
            if features_of_group is not None:
                kept_features = kept_features.index_copy(0, group.objects, features_of_group.to(kept_features.dtype))
                kept_objects = kept_objects | set(group.members)
    if groups:
        # back into object order
        order = torch.argsort(tracked)
        tracked = tracked[order]
        low_res, high_res, obj_ptr, object_score = (torch.cat(v)[order]
                                                    for v in (low_res, high_res, obj_ptr, object_score))
        low_res, high_res, object_score = low_res.float(), high_res.float(), object_score.float()
        scored_present = object_score[:, 0] > 0
        if departures.presence_from_prompts:
            prompted = torch.cat([torch.full((len(g.objects),), g.prompted, device=device) for g in groups])[order]
            tracked_present = torch.where(prompted, prompts.present[tracked, prompt_slice], scored_present)
            low_res = torch.where(tracked_present[:, None, None, None], low_res, ABSENT_LOGIT)
        else:
            tracked_present = scored_present
        full_low_res[tracked], full_score[tracked], present[tracked] = low_res, object_score, tracked_present
        if write_memory:
            memory_score = object_score
            if departures.presence_from_prompts:
                remembered = _remembered_present(tracked_present, prompted, low_res)
                obj_ptr = torch.where(remembered[:, None], obj_ptr, sam_model.no_obj_ptr)
                high_res = torch.where(remembered[:, None, None, None], high_res, NO_OBJ_SCORE)
                memory_score = torch.where(remembered[:, None], PRESENT_SCORE, ABSENT_SCORE)
            memory = {"obj_ptr": obj_ptr}
            sam_model._encode_memory_in_output([x[:, tracked] for x in vision_feats] if skipped else vision_feats,
                                               features.feat_sizes, None, True, high_res, memory_score, memory)
    if write_memory:
        if skipped:
            absent = _absent_memory(sam_model, vision_feats, features.feat_sizes, len(skipped))
            order = torch.argsort(torch.cat([tracked, object_index(tuple(skipped), device)]))
            memory = absent if not groups else {
                "obj_ptr": torch.cat([memory["obj_ptr"], absent["obj_ptr"].to(memory["obj_ptr"].dtype)])[order],
                "maskmem_features": torch.cat([memory["maskmem_features"], absent["maskmem_features"]])[order],
                "maskmem_pos_enc": [torch.cat(pair)[order] for pair in zip(memory["maskmem_pos_enc"],
                                                                            absent["maskmem_pos_enc"])]}
        if not sam_model.training:
            memory["maskmem_features"] = memory["maskmem_features"].to(EVALUATION_MEMORY_DTYPE)
        memory = {key: memory[key] for key in MEMORY_KEYS}
    return SliceOutput(low_res=full_low_res, object_score=full_score, present=present, memory=memory,
                       conditioned=kept_features, conditioned_objects=kept_objects)


class SliceWalk:
    """A walk through the D slices of a patch or volume, in SAM 2's order, with its memory bank.

    With memory, slice 0 is the conditioning frame and the others follow in order, each tracked from the
    memories before it (`Departures.prompted_slices_use_memory`); with the departure off, every prompted slice
    is a conditioning frame, segmented first, as SAM2VideoPredictor treats prompts given on several frames
    before it propagates. Without memory every slice is an initial frame and nothing is remembered.

    The refinement passes share the walk: on each slice, pass 1 is tracked, each later pass corrects it with its
    own prompts against the same memory (`correcting`, reusing pass 1's memory-conditioned features), and only
    the final pass's result is remembered (`remember`), as SAM 2 re-encodes a frame's memory after a person's
    correction of it and before it propagates further."""

    def __init__(self, sam_model: SAM2Base, num_slices: int, use_memory: bool, departures: Departures = REFINER,
                 unprompted: frozenset[int] = frozenset(), skip_absent: bool = False):
        self.sam, self.num_slices, self.use_memory = sam_model, num_slices, use_memory
        self.departures, self.skip_absent = departures, skip_absent
        self.conditioning = {0}
        if use_memory and not departures.prompted_slices_use_memory:
            self.conditioning |= {d for d in range(1, num_slices) if d not in unprompted}
        first = sorted(self.conditioning) if use_memory else []
        self.order = first + [d for d in range(num_slices) if d not in self.conditioning or not use_memory]
        self.bank = MemoryBank(sam_model)
        self.steps = num_slices

    def end_after(self, steps: int) -> None:
        """Take only the first `steps` steps of the walk (prediction ends it after the last slice with a stage-1
        foreground): the memory of the last one would serve no slice, so it is not written."""
        self.steps = steps

    @property
    def in_slice_order(self) -> bool:
        """Whether the walk visits slice 0, 1, ... in turn (then features can be computed as it goes)."""
        return self.order == list(range(self.num_slices))

    def step(self, step_index: int, features: SliceFeatures, feature_slice: int, prompts: ObjectPrompts,
             prompt_slice: int, correcting: SliceOutput | None = None, remember: bool = True) -> SliceOutput:
        """Track the walk's `step_index`-th slice, image `feature_slice` of `features`, or correct the output
        `correcting` of an earlier pass there; `remember`: this result becomes the slice's memory."""
        d = self.order[step_index]
        conditioning = d in self.conditioning
        out = track_slice(self.sam, features, feature_slice, prompts, prompt_slice, self.bank,
                          is_init_cond_frame=conditioning or not self.use_memory,
                          write_memory=remember and self.use_memory and step_index < self.steps - 1,
                          departures=self.departures, frame_index=d, num_frames=self.num_slices,
                          skip_absent=self.skip_absent, correcting=correcting)
        if out.memory is not None:
            self.bank.add(d, out.memory, conditioning)
        return out


def refine_slices(sam_model: SAM2Base, features: SliceFeatures, prompts: ObjectPrompts, use_memory: bool,
                  patch_hw: tuple[int, int], departures: Departures = REFINER) -> SliceLogits:
    """One pass: SAM 2's mask logits for every object on every slice of `features`, given the prompts."""
    num_slices = prompts.present.shape[1]
    walk = SliceWalk(sam_model, num_slices, use_memory, departures, prompts.unprompted)
    outputs = {d: walk.step(step, features, d, prompts, d) for step, d in enumerate(walk.order)}
    low_res = torch.cat([outputs[d].low_res for d in range(num_slices)], dim=1)  # (N, D, S/4, S/4)
    patch = logits_to_grid(low_res, patch_hw)
    if departures.presence_from_prompts:
        # resampling a constant is only nearly constant in floating point: restore it exactly
        present = torch.stack([outputs[d].present for d in range(num_slices)], dim=1)
        patch = torch.where(present[:, :, None, None], patch, ABSENT_LOGIT)
    return SliceLogits(low_res=low_res, patch=patch,
                       object_scores=torch.cat([outputs[d].object_score for d in range(num_slices)], dim=1))
