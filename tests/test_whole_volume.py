"""Whole-volume cascade prediction: nnU-Net's predictor hands the refiner whole volumes, each slice is encoded
once per test-time mirror, SAM 2's memory reaches across the volume and stays bounded, and absent objects cost
no SAM 2 step (whole_volume_prediction.py, model/network.py, model/refinement.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_NAME, PLANS, TEST_SAM2_IMAGE_SIZE
from nnunetv2_rfmedsam.model import network as network_module
from nnunetv2_rfmedsam.model import refinement
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.trainers import nnUNetTrainerRFMedSAM2
from nnunetv2_rfmedsam.whole_volume_prediction import memory_attempts, predict_whole_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hippocampus_volume(case_index: int = 0, slices: int | None = None, absent_class: int | None = None):
    """A real hippocampus image (z-scored) and its label as stage-1 masks: (1, 3, D, H, W)."""
    source = hippocampus_source()
    case = list_cases(source)[case_index]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"))).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")))
    image = (image - image.mean()) / image.std()
    masks = [(label == k).astype(np.float32) for k in (1, 2)]
    if absent_class is not None:
        masks[absent_class - 1][:] = 0
    x = torch.from_numpy(np.stack([image, *masks]))[None]
    return x if slices is None else x[:, :, :slices]


def fresh_network(**settings) -> RFMedSAM2Network:
    torch.manual_seed(0)
    network = RFMedSAM2Network(3, 3, image_size=TEST_SAM2_IMAGE_SIZE, **settings).eval()
    if network.prompt_gates is not None:
        # a refiner that moves away from its prompt, so SAM 2's part shows in the output
        network.set_prompt_gates(0.6)
    return network


class EncoderCalls:
    """Counts the frames SAM 2's image encoder sees, the objects of each `_track_step` and of each run of SAM 2's
    heads (a step's, or a correction's), and the objects through memory attention and the memory encoder."""

    def __init__(self, network: RFMedSAM2Network):
        self.frames, self.objects, self.heads, self.attended, self.encoded = 0, [], [], [], []
        sam = network.sam
        forward_image, track_step, heads = sam.forward_image, sam._track_step, sam._forward_sam_heads
        attention, encode_memory = sam.memory_attention.forward, sam._encode_new_memory

        def counting_forward_image(frames):
            self.frames += frames.shape[0]
            return forward_image(frames)

        def counting_track_step(*args, **kwargs):
            self.objects.append(kwargs["current_vision_feats"][0].shape[1])
            return track_step(*args, **kwargs)

        def counting_heads(*args, **kwargs):
            self.heads.append(kwargs["backbone_features"].shape[0])
            return heads(*args, **kwargs)

        def counting_attention(*args, **kwargs):
            self.attended.append(kwargs["curr"][0].shape[1])
            return attention(*args, **kwargs)

        def counting_encode_memory(*args, **kwargs):
            self.encoded.append(kwargs["pred_masks_high_res"].shape[0])
            return encode_memory(*args, **kwargs)

        sam.forward_image, sam._track_step, sam._forward_sam_heads = counting_forward_image, counting_track_step, \
            counting_heads
        sam.memory_attention.forward, sam._encode_new_memory = counting_attention, counting_encode_memory


@pytest.fixture(scope="module")
def predictor_parts(planned_workspace):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    preprocessed = planned_workspace["root"] / "preprocessed" / DATASET_NAME
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    return PlansManager(plans), dataset_json, planned_workspace


def cascade_predictor(predictor_parts, whole_volumes: bool):
    """nnU-Net's own predictor with a stage-2 network as its checkpoint would give it, and the trainer's
    test-time mirroring."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    plans_manager, dataset_json, _ = predictor_parts
    configuration = plans_manager.get_configuration("3d_rfmedsam2")
    network = nnUNetTrainerRFMedSAM2.build_network_architecture(plans_manager, configuration, 3, 3, False)
    network.predicts_whole_volumes = whole_volumes
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"),
                                perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()], dataset_json,
                                    "nnUNetTrainerRFMedSAM2", (len(configuration.patch_size) - 1,))
    return predictor, network


def test_predictor_encodes_each_slice_once_per_mirror_and_keeps_geometry(predictor_parts):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    workspace = predictor_parts[2]
    case = workspace["test"][0]
    image, properties = SimpleITKIO().read_images([str(workspace["raw"] / "imagesTs" / f"{case}_0000.nii.gz")])
    stage1 = sitk.GetArrayFromImage(sitk.ReadImage(str(workspace["raw"] / "labelsTs" / f"{case}.nii.gz")))
    results = {}
    for whole_volumes in (True, False):
        predictor, network = cascade_predictor(predictor_parts, whole_volumes)
        calls, shapes = EncoderCalls(network), []
        network.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[2:])))
        segmentation = predictor.predict_single_npy_array(image, properties, stage1[None].astype(np.int16),
                                                          None, False)
        results[whole_volumes] = (calls.frames, shapes, segmentation)
    frames, shapes, segmentation = results[True]
    # one call per test-time mirror (here one axis, the plans' switch), each with the whole volume; every slice
    # encoded once per mirror, up to the last slice with a stage-1 foreground (after it, nothing is walked)
    assert len(shapes) == 2 and shapes[0] == shapes[1] and shapes[0][0] == stage1.shape[0]
    walked = int(np.nonzero(stage1.any(axis=(1, 2)))[0][-1]) + 1
    assert frames == 2 * walked
    assert segmentation.shape == image.shape[1:]
    assert set(np.unique(segmentation)) <= {0, 1, 2} and (segmentation > 0).any()
    # nnU-Net's sliding window, for comparison, encodes slices once per overlapping window and mirror
    windowed_frames, windowed_shapes, _ = results[False]
    assert len(windowed_shapes) > 2 and windowed_frames > frames


def run(network: RFMedSAM2Network, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network(x)


def test_streaming_and_memory_bank_bound_change_nothing(monkeypatch):
    """A 40-slice volume: encoding 4 slices at a time equals encoding all at once, and the bounded memory bank
    (reach 16 here, less than the volume) equals an unbounded one, so it drops only memories SAM 2 no longer
    reads."""
    x = hippocampus_volume()
    assert x.shape[2] > 2 * refinement.MemoryBank(fresh_network().sam).reach
    streamed = run(fresh_network(), x)

    class Unbounded(refinement.MemoryBank):
        def __init__(self, sam_model):
            super().__init__(sam_model)
            self.reach = 10 ** 6

    monkeypatch.setattr(network_module, "SLICES_PER_ENCODER_CALL", x.shape[2])
    monkeypatch.setattr(refinement, "MemoryBank", Unbounded)
    reference = run(fresh_network(), x)
    torch.testing.assert_close(streamed, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(streamed[:, 1:], (2 * x[:, 1:] - 1) * network_module.PROMPT_LOGIT), \
        "SAM 2 left no trace in the output: the comparison would be vacuous"


def test_memory_bank_holds_only_what_sam2_can_read():
    sam = fresh_network().sam
    bank = refinement.MemoryBank(sam)
    bank.add(0, {"frame": 0}, conditioning=True)
    for d in range(1, 60):
        bank.add(d, {"frame": d}, conditioning=False)
        assert len(bank.output_dict["non_cond_frame_outputs"]) <= bank.reach + 1
    assert set(bank.output_dict["cond_frame_outputs"]) == {0}
    assert min(bank.output_dict["non_cond_frame_outputs"]) == 59 - bank.reach
    # SAM 2 reads back num_maskmem - 1 memories and max_obj_ptrs_in_encoder - 1 object pointers
    assert bank.reach >= max(sam.num_maskmem - 1, sam.max_obj_ptrs_in_encoder - 1)


@pytest.mark.parametrize("start_at_prompt", [True, False])
def test_absent_objects_skip_sam2_and_change_nothing(monkeypatch, start_at_prompt):
    """Prediction skips SAM 2 for objects absent by their prompts (per slice, and a class absent from the whole
    volume entirely) and gives what running them would give."""
    x = hippocampus_volume(slices=24, absent_class=2)
    network = fresh_network(start_at_prompt=start_at_prompt)
    calls = EncoderCalls(network)
    skipped = run(network, x)
    # class 2 is absent everywhere: every SAM 2 step tracks class 1 alone, and only where it is present (pass 1:
    # its stage-1 mask; pass 2: pass 1's result)
    present_slices = int(x[0, 1].flatten(1).any(dim=1).sum())
    assert 0 < present_slices < x.shape[2]
    assert set(calls.objects) == {1} and present_slices <= len(calls.objects) <= 2 * present_slices
    assert (skipped[0, 2] == refinement.ABSENT_LOGIT).all() if not start_at_prompt else (skipped[0, 2] < 0).all()

    class RunEveryObject(refinement.SliceWalk):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **dict(kwargs, skip_absent=False))

    monkeypatch.setattr(network_module, "SliceWalk", RunEveryObject)
    network = fresh_network(start_at_prompt=start_at_prompt)
    monkeypatch.setattr(network, "_objects_to_track", lambda objects: torch.arange(objects.shape[0]))
    calls = EncoderCalls(network)
    everything = run(network, x)
    # pass 1 steps both objects on every slice, pass 2 corrects them there
    assert calls.objects == [2] * x.shape[2] and calls.heads == [2] * (2 * x.shape[2])
    torch.testing.assert_close(skipped, everything, rtol=0, atol=1e-4)


def test_slices_after_the_last_foreground_are_neither_encoded_nor_walked(monkeypatch):
    x = hippocampus_volume()
    labelled = x[0, 1:].flatten(2).any(dim=2).any(dim=0).nonzero()[:, 0]
    last = int(labelled[-1])
    x = x[:, :, last - 9:last + 4]  # 10 slices with foreground, then 3 without
    network = fresh_network()
    calls = EncoderCalls(network)
    walks = []

    class RecordedWalk(refinement.SliceWalk):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            walks.append(self)

    monkeypatch.setattr(network_module, "SliceWalk", RecordedWalk)
    walked = run(network, x)
    assert calls.frames == 10
    # the last walked slice's memory would serve no slice: it is not encoded
    assert set(walks[0].bank.output_dict["non_cond_frame_outputs"]) == set(range(1, 9))
    assert (walked[0, 1:, 10:] == (2 * x[0, 1:, 10:] - 1) * network_module.PROMPT_LOGIT * 0.4 +
            0.6 * refinement.ABSENT_LOGIT).all()

    class RunEveryObject(refinement.SliceWalk):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **dict(kwargs, skip_absent=False))

    monkeypatch.setattr(network_module, "SliceWalk", RunEveryObject)
    network = fresh_network()
    calls = EncoderCalls(network)
    torch.testing.assert_close(walked, run(network, x), rtol=0, atol=1e-4)
    assert calls.frames == 13


def test_the_second_pass_corrects_each_slice_against_the_memory_of_the_final_pass(monkeypatch):
    """Per slice, memory attention and the memory encoder run once for every object (pass 1's features serve
    pass 2's correction, and the final result is remembered), and the reuse is exact: pass 2 recomputing its
    memory-conditioned features with SAM 2's `_track_step` on the same memory bank gives the same logits."""
    x = hippocampus_volume()
    both = (x[0, 1].flatten(1).any(dim=1) & x[0, 2].flatten(1).any(dim=1)).nonzero()[:, 0]
    x = x[:, :, int(both[0]):int(both[0]) + 8]  # both classes on every slice: none is skipped as absent
    depth = x.shape[2]
    assert x[0, 1:].flatten(2).any(dim=2).all()
    network = fresh_network()
    calls = EncoderCalls(network)
    reused = run(network, x)
    assert calls.attended == [2] * (depth - 1)  # slice 0 is the conditioning frame: no memory to attend to
    assert calls.encoded == [2] * (depth - 1)  # the last slice's memory would serve no slice
    assert calls.objects == [2] * depth and calls.heads == [2] * (2 * depth)

    monkeypatch.setattr(refinement.SliceOutput, "conditioned_for", lambda self, objects: None)
    network = fresh_network()
    calls = EncoderCalls(network)
    recomputed = run(network, x)
    assert calls.objects == [2] * (2 * depth) and calls.attended == [2] * (2 * (depth - 1))
    torch.testing.assert_close(reused, recomputed, rtol=0, atol=1e-5)
    assert not torch.allclose(reused[:, 1:], (2 * x[:, 1:] - 1) * network_module.PROMPT_LOGIT), \
        "SAM 2 left no trace in the output: the comparison would be vacuous"


def test_a_volume_without_any_foreground_costs_no_encoder_call():
    x = hippocampus_volume(slices=10)
    x[:, 1:] = 0
    network = fresh_network()
    calls = EncoderCalls(network)
    logits = run(network, x)
    assert calls.frames == 0 and not calls.objects
    assert (logits.argmax(1) == 0).all()


# --- out of memory ---

def test_memory_attempts_follow_nnunet_then_split_the_classes():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory_attempts(cuda, True, 13) == [(cuda, 13), (cpu, 13), (cpu, 7), (cpu, 4), (cpu, 2), (cpu, 1)]
    assert memory_attempts(cuda, False, 2) == [(cpu, 2), (cpu, 1)]  # results on the CPU as the predictor asks
    assert memory_attempts(cpu, True, 1) == [(cpu, 1)]


def test_out_of_memory_tries_again_class_by_class_with_the_same_answer(monkeypatch, capsys):
    """A walk of more than one class runs out of memory (injected): the prediction tries again, one class per walk,
    and gives the logits of the walk of both classes, to float32 rounding, and the same label map."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    network = fresh_network()
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False,
                                use_mirroring=False)
    predictor.network, predictor.allowed_mirroring_axes = network, None
    volume = hippocampus_volume(slices=12)[0]
    expected = predict_whole_volume(predictor, volume)
    refine, walks = RFMedSAM2Network._refine, []

    def refine_within_memory(self, x, keep_all_passes=True):
        classes = int(x[:, self.image_channels:].flatten(2).any(dim=2).sum())
        walks.append(classes)
        if classes > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return refine(self, x, keep_all_passes)

    monkeypatch.setattr(RFMedSAM2Network, "_refine", refine_within_memory)
    retried = predict_whole_volume(predictor, volume)
    assert walks == [2, 1, 1]
    printed = capsys.readouterr().out
    assert "ran out of memory; trying again with the logits on cpu and 1 of 2 classes per walk" in printed
    assert expected.dtype == retried.dtype == torch.float16  # nnU-Net's result buffers' precision
    # float32 rounding apart, rounded to half precision: at most one half-precision step apart (2^-6 up to 32)
    torch.testing.assert_close(retried, expected, atol=2 ** -6, rtol=0)
    assert torch.equal(retried.argmax(dim=0), expected.argmax(dim=0))
    assert network.results_device is None and network.slice_progress is None
