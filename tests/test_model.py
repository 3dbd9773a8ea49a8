"""The stage-2 network: SAM 2 at a small input size, adapters, prompts, refinement passes, checkpoints.

Everything runs SAM 2.1 tiny at a 64 x 64 input on the CPU, from random weights saved and loaded in the
official checkpoint format.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_rfmedsam.model.adapters import (CNNAdapter, DWConvAdapter, OBJECT_SCORE_PARTS,
                                              TRAINABLE_DECODER_HEADS, adapter_modules, adapter_parameter_names)
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
from nnunetv2_rfmedsam.model.prompts import (BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, MASK_PROMPT_LOGIT, NOT_A_POINT,
                                             POSITIVE_CLICK, ObjectPrompts, boxes_from_masks,
                                             boxes_to_square_frame, drop_training_prompts, jitter_boxes,
                                             masks_to_prompt_logits, prompts_from_masks)
from nnunetv2_rfmedsam.model.refinement import ABSENT_LOGIT
from nnunetv2_rfmedsam.model.sam2_checkpoint import (SAM2CheckpointError, load_sam2_checkpoint,
                                                     save_official_format_checkpoint)
from nnunetv2_rfmedsam.model.sam2_model import build_sam2_model
from nnunetv2_rfmedsam.model.sam2_reference import REFERENCE_KEY
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.settings import NETWORK_CLASS, OFFICIAL_CHECKPOINT_HINT, SAM2Settings

IMAGE_SIZE = 64
SETTINGS = dict(model_size="tiny", image_size=IMAGE_SIZE, adapter_width=32, refinement_passes=2,
                slices_per_patch=4, use_memory=True, box_jitter=0.1,
                # these tests look at SAM 2's own logits; the gate that starts at the prompt is tested on its own
                start_at_prompt=False)
NUM_CLASSES = 2  # foreground classes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_network(seed: int = 0, **changes) -> RFMedSAM2Network:
    torch.manual_seed(seed)
    return RFMedSAM2Network(input_channels=1 + NUM_CLASSES, num_classes=NUM_CLASSES + 1, deep_supervision=False,
                            **{**SETTINGS, **changes})


def synthetic_patch() -> torch.Tensor:
    """(B=2, 1 + 2, D=4, 20, 24): class 1 on every slice, class 2 on slices 1 and 2 only (absent on slice 0),
    nothing at all on slice 3 of the second patch."""
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 1 + NUM_CLASSES, 4, 20, 24)
    x[:, 0] = torch.randn(2, 4, 20, 24, generator=generator)
    x[:, 1, :, 4:11, 5:13] = 1
    x[1, 1, 3] = 0
    x[:, 2, 1:3, 12:17, 10:20] = 1
    x[:, 0] += 1.5 * x[:, 1] - 1.0 * x[:, 2]  # give the image some structure where the masks are
    return x


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sam2_checkpoints")


@pytest.fixture(scope="module")
def tiny_checkpoint(checkpoint_dir) -> Path:
    return save_official_format_checkpoint(checkpoint_dir / "sam2.1_hiera_tiny.pt", "tiny", seed=1)


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_checkpoint) -> dict:
    return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def loaded_network(tiny_checkpoint) -> RFMedSAM2Network:
    net = make_network()
    net.load_sam2_checkpoint(tiny_checkpoint)
    return net


def variant(network: RFMedSAM2Network, **changes) -> RFMedSAM2Network:
    """A network with other settings and the same weights (without memory, the memory-attention adapters are not
    there: every other weight must be)."""
    other = make_network(**changes)
    keys = set(other.state_dict()) | {REFERENCE_KEY}  # the reference brings SAM 2's frozen weights
    other.load_state_dict({k: v for k, v in network.state_dict().items() if k in keys})
    return other


# --- adapters ---

def test_dwconv_adapter_starts_as_identity():
    adapter = DWConvAdapter(dim=16, width=8, token_grid=(5, 6))
    grid = torch.randn(3, 5, 6, 16)
    assert torch.equal(adapter(grid), grid)
    tokens = torch.randn(3, 30, 16)
    assert torch.equal(adapter(tokens), tokens)


def test_dwconv_adapter_tokens_are_a_row_major_grid():
    adapter = DWConvAdapter(dim=16, width=8, token_grid=(5, 6))
    torch.nn.init.normal_(adapter.up.weight)  # no longer the identity
    grid = torch.randn(2, 5, 6, 16)
    torch.testing.assert_close(adapter(grid.flatten(1, 2)), adapter(grid).flatten(1, 2))


def test_cnn_adapter_starts_as_identity():
    adapter = CNNAdapter(channels=32, width=8)
    x = torch.randn(2, 32, 7, 9)
    assert torch.equal(adapter(x), x)


def test_adapter_placement_and_parameter_share():
    net = make_network()
    adapters = adapter_modules(net)
    sam = net.sam
    hiera_blocks = len(sam.image_encoder.trunk.blocks)
    expected = (hiera_blocks + len(sam.image_encoder.neck.convs) + 2 * len(sam.memory_attention.layers)
                + len(sam.sam_mask_decoder.transformer.layers))
    assert len(adapters) == expected == 12 + 4 + 8 + 2
    # each Hiera adapter works at its block's output width
    for block in sam.image_encoder.trunk.blocks:
        assert block.attn.adapter.norm_in.normalized_shape == (block.dim_out,)
    adapter_params = sum(p.numel() for a in adapters for p in a.parameters())
    _, total = net.parameter_counts()
    assert adapter_params / total < 0.02


def test_adapters_keep_sam2_parameter_names():
    plain = build_sam2_model("tiny", IMAGE_SIZE)
    net = make_network()
    adapted_keys = set(net.sam.state_dict())
    assert set(plain.state_dict()) == adapted_keys - adapter_parameter_names(net.sam)


def test_only_adapters_and_decoder_heads_train():
    net = make_network()
    adapter_params = {id(p): p for a in adapter_modules(net) for p in a.parameters()}
    head_params = {id(p): p for name in TRAINABLE_DECODER_HEADS + OBJECT_SCORE_PARTS
                   for p in getattr(net.sam.sam_mask_decoder, name).parameters()}
    should_train = adapter_params | head_params
    for name, p in net.named_parameters():
        assert p.requires_grad == (id(p) in should_train), name
    trainable, total = net.parameter_counts()
    assert trainable == sum(p.numel() for p in should_train.values())
    assert total == sum(p.numel() for p in net.parameters())


def test_network_at_init_equals_unadapted_sam2(loaded_network, tiny_checkpoint):
    unadapted = copy.deepcopy(loaded_network)
    unadapted.sam = build_sam2_model("tiny", IMAGE_SIZE)
    load_sam2_checkpoint(unadapted.sam, tiny_checkpoint, "tiny")
    assert not adapter_modules(unadapted)
    x = synthetic_patch()
    for mode in ("eval", "train"):
        outputs = []
        for net in (loaded_network, unadapted):
            getattr(net, mode)()
            torch.manual_seed(3)  # the same box jitter and dropout in training mode
            with torch.no_grad():
                outputs.append(net(x, return_all_passes=True))
        for adapted, plain in zip(*(o.passes for o in outputs)):
            torch.testing.assert_close(adapted, plain, atol=1e-5, rtol=0)
    loaded_network.eval()


def test_optimizer_step_moves_adapters_and_heads_only(tiny_checkpoint):
    net = make_network()
    net.load_sam2_checkpoint(tiny_checkpoint)
    net.train()
    x = synthetic_patch()
    target = x[:, 1:].argmax(1) + 1
    target[x[:, 1:].sum(1) == 0] = 0
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    loss = sum(F.cross_entropy(output, target) for output in net(x).passes)
    loss.backward()
    optimizer.step()
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert changed <= trainable
    for module_name, module in net.named_modules():
        if isinstance(module, (DWConvAdapter, CNNAdapter)):
            assert f"{module_name}.up.weight" in changed, module_name
    decoder = "sam.sam_mask_decoder"
    assert {f"{decoder}.output_upscaling.0.weight", f"{decoder}.output_hypernetworks_mlps.0.layers.0.weight"} <= changed


# --- prompts ---

def test_boxes_from_masks_exact_coordinates():
    masks = torch.zeros(2, 3, 6, 8)  # 2 slices, 3 classes
    masks[0, 0, 1:4, 2:6] = 1  # rows 1-3, columns 2-5
    masks[0, 1, 5, 7] = 1  # a single pixel in the last row and column
    masks[1, 0, 0, 0] = 1
    masks[1, 0, 4, 3] = 1  # two separate pixels: the box spans both
    masks[1, 2, 2:4, 0] = 1
    boxes, present = boxes_from_masks(masks)
    assert present.tolist() == [[True, True, False], [True, False, True]]
    assert boxes[0, 0].tolist() == [2, 1, 5, 3]
    assert boxes[0, 1].tolist() == [7, 5, 7, 5]
    assert boxes[1, 0].tolist() == [0, 0, 3, 4]
    assert boxes[1, 2].tolist() == [0, 2, 0, 3]
    assert boxes[0, 2].tolist() == boxes[1, 1].tolist() == [0, 0, 0, 0]
    # booleans and soft one-hot values (after nnU-Net's spatial augmentation) give the same boxes
    assert torch.equal(boxes_from_masks(masks.bool())[0], boxes)
    assert torch.equal(boxes_from_masks(masks * 0.9)[0], boxes)


def test_boxes_per_slice_of_a_volume_match_numpy():
    rng = np.random.default_rng(0)
    volume = rng.random((5, 9, 11)) > 0.9
    volume[2] = False
    boxes, present = boxes_from_masks(torch.from_numpy(volume))
    for d in range(5):
        ys, xs = np.nonzero(volume[d])
        assert bool(present[d]) == (len(ys) > 0)
        if len(ys):
            assert boxes[d].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_jitter_stays_within_fraction_and_image():
    generator = torch.Generator().manual_seed(0)
    height, width = 30, 40
    corners = torch.randint(0, 30, (200, 2, 2), generator=generator).float()
    boxes = torch.stack([corners[:, :, 0].min(1).values, corners[:, :, 1].min(1).values,
                         corners[:, :, 0].max(1).values, corners[:, :, 1].max(1).values], dim=-1)
    present = torch.rand(200, generator=generator) > 0.2
    fraction = 0.3
    jittered = jitter_boxes(boxes, present, fraction, (height, width), generator)
    sides = torch.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1] * 2, dim=-1)
    assert ((jittered - boxes).abs() <= fraction * sides + 1e-5).all()
    assert (jittered[:, [0, 2]] >= 0).all() and (jittered[:, [0, 2]] <= width - 1).all()
    assert (jittered[:, [1, 3]] >= 0).all() and (jittered[:, [1, 3]] <= height - 1).all()
    assert (jittered[:, 0] <= jittered[:, 2]).all() and (jittered[:, 1] <= jittered[:, 3]).all()
    assert torch.equal(jittered[~present], boxes[~present])
    assert not torch.equal(jittered[present], boxes[present])
    assert torch.equal(jitter_boxes(boxes, present, 0.0, (height, width)), boxes)


def test_boxes_and_masks_scale_to_sam_frame():
    # sam2's predictors scale a user's pixel coordinates by S / W along x and S / H along y
    box = torch.tensor([0.0, 0.0, 23.0, 19.0])
    scaled = boxes_to_square_frame(box, (20, 24), 64)
    torch.testing.assert_close(scaled, torch.tensor([0.0, 0.0, 23.0 * 64 / 24, 19.0 * 64 / 20]))
    assert torch.equal(boxes_to_square_frame(box, (64, 64), 64), box)
    masks = torch.zeros(2, 20, 24)
    masks[0] = 1
    logits = masks_to_prompt_logits(masks, 16)
    assert logits.shape == (2, 16, 16)
    torch.testing.assert_close(logits[0], torch.full((16, 16), MASK_PROMPT_LOGIT))
    torch.testing.assert_close(logits[1], torch.full((16, 16), -MASK_PROMPT_LOGIT))


def test_point_inputs_are_box_corners_then_clicks():
    present = torch.tensor([[True, False], [False, True]])
    boxes = torch.arange(16, dtype=torch.float32).reshape(2, 2, 4)
    prompts = ObjectPrompts(present=present, boxes=boxes)
    coords, labels = prompts.slice_points(0)
    assert labels.tolist() == [[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], [NOT_A_POINT, NOT_A_POINT]]
    assert coords[0].tolist() == [[0, 1], [2, 3]]
    assert prompts.mask_inputs(0) is None
    clicks = torch.ones(2, 2, 1, 2)
    labels = torch.full((2, 2, 1), POSITIVE_CLICK)
    coords, labels = ObjectPrompts(present=present, boxes=boxes, clicks=clicks, click_labels=labels).slice_points(1)
    assert labels.tolist() == [[NOT_A_POINT, NOT_A_POINT, POSITIVE_CLICK],
                               [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, POSITIVE_CLICK]]
    assert coords.shape == (2, 3, 2)


def test_prompt_dropout_leaves_later_slices_to_memory():
    masks = synthetic_patch()[:, 1:].reshape(-1, 4, 20, 24)  # objects (patch, class)
    prompts = prompts_from_masks(masks, IMAGE_SIZE)
    nearly_always = drop_training_prompts(prompts, 0.999, torch.Generator().manual_seed(0))
    # slice 0 starts the memory, and class 2 appears on slice 1: neither goes without prompts
    assert nearly_always.unprompted == {2, 3}
    assert nearly_always.unmasked == {0, 1}
    for d in (2, 3):
        assert nearly_always.mask_inputs(d) is None
    assert nearly_always.slice_points(1)[1].shape == (4, 2) and nearly_always.mask_inputs(1) is None
    never = drop_training_prompts(prompts, 0.0)
    assert never.unprompted == never.unmasked == frozenset()
    assert never.mask_inputs(3).shape == (4, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4)


# --- the network ---

def test_network_built_from_plans_like_nnunet():
    settings = SAM2Settings(**SETTINGS)
    net = get_network_from_plans(NETWORK_CLASS, settings.to_plans(), [], input_channels=1 + NUM_CLASSES,
                                 output_channels=NUM_CLASSES + 1, allow_init=True, deep_supervision=False)
    assert isinstance(net, RFMedSAM2Network) and not hasattr(net, "initialize")
    assert net.settings == settings


def test_non_finite_intensities_stop_the_forward_before_sam2(loaded_network):
    """The last line of defence behind the checks of files: NaN would pass through the frames into SAM 2."""
    x = synthetic_patch()
    x[1, 0, 2, 3, 4] = float("nan")
    x[0, 0, 0, 0, 0] = float("-inf")
    encoded = []
    hook = loaded_network.sam.image_encoder.register_forward_hook(lambda *_: encoded.append(1))
    try:
        with pytest.raises(ValueError) as error, torch.no_grad():
            loaded_network(x)
    finally:
        hook.remove()
    message = str(error.value)
    assert message.startswith(f"image channels: 2 of {2 * 4 * 20 * 24} voxels are not finite (NaN or infinite)")
    assert "\n" not in message and encoded == []


def test_passes_give_lists_in_training_and_the_final_pass_in_evaluation(loaded_network):
    x = synthetic_patch()
    shape = (2, NUM_CLASSES + 1, 4, 20, 24)
    two_passes = variant(loaded_network)
    one_pass = variant(loaded_network, refinement_passes=1)
    with torch.no_grad():
        for net, count in ((two_passes, 2), (one_pass, 1)):
            net.train()
            outputs = net(x).passes
            assert isinstance(outputs, list) and len(outputs) == count
            assert all(o.shape == shape and o.dtype == torch.float32 and torch.isfinite(o).all() for o in outputs)
            assert torch.equal(outputs[0][:, 0], torch.zeros_like(outputs[0][:, 0]))
            net.eval()
            assert isinstance(net(x), torch.Tensor) and len(net(x, return_all_passes=True).passes) == count
        final_of_two = two_passes(x)
        assert torch.equal(final_of_two, two_passes(x))  # no box jitter outside training
        first_of_two = two_passes(x, return_all_passes=True).passes[0]
        only_pass = one_pass(x)
    assert final_of_two.shape == only_pass.shape == shape
    # slice 0 reads no memory: pass 1 there is the one-pass network; later slices read the memory of pass 2's
    # result (the final pass is remembered), so pass 1 differs from the one-pass network there
    torch.testing.assert_close(first_of_two[:, :, 0], only_pass[:, :, 0])
    assert not torch.allclose(first_of_two[:, :, 1:], only_pass[:, :, 1:])
    assert not torch.allclose(final_of_two, only_pass)


def test_memory_changes_later_slices_only(loaded_network):
    x = synthetic_patch()
    with_memory = variant(loaded_network, use_memory=True).eval()
    without_memory = variant(loaded_network, use_memory=False).eval()
    with torch.no_grad():
        a = with_memory(x, return_all_passes=True)
        b = without_memory(x, return_all_passes=True)
    for pass_a, pass_b in zip(a.passes, b.passes):
        torch.testing.assert_close(pass_a[:, :, 0], pass_b[:, :, 0])
    assert not torch.allclose(a.passes[0][:, 1:, 1:], b.passes[0][:, 1:, 1:])


def test_absent_class_is_background(loaded_network):
    x = synthetic_patch()
    network = variant(loaded_network, training_prompt_dropout=0.0).train()
    with torch.no_grad():
        outputs = network(x)
    for logits in outputs.passes:
        # class 2 has no prompt on slice 0 nor slice 3
        assert (logits[:, 2, [0, 3]] == ABSENT_LOGIT).all()
        # no class on slice 3 of the second patch: background everywhere
        assert (logits[1, 1:, 3] == ABSENT_LOGIT).all()
        assert (logits[1, :, 3].argmax(0) == 0).all()
        assert torch.isfinite(torch.softmax(logits, 1)).all()


def test_training_segments_unprompted_slices_from_memory(loaded_network):
    network = variant(loaded_network, training_prompt_dropout=0.999).train()
    calls = []  # per run of SAM 2's heads (pass 1's step, pass 2's correction): (unprompted, object scores)
    original = network.sam._forward_sam_heads

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((kwargs["point_inputs"] is None and kwargs["mask_inputs"] is None, result[-1][:, 0].detach()))
        return result

    network.sam._forward_sam_heads = recording
    outputs = network(synthetic_patch()).passes
    # both passes on a slice before the next slice; pass 2 is prompted everywhere
    assert [unprompted for unprompted, _ in calls] == [False, False, False, False, True, False, True, False]
    for d in (2, 3):
        # SAM 2's object score decides presence where there is no prompt, not the stage-1 mask
        visible = calls[2 * d][1] > 0
        first_pass = outputs[0][:, 1:, d].reshape(-1, 20, 24)
        assert torch.equal((first_pass == ABSENT_LOGIT).flatten(1).all(dim=1), ~visible)
    # the unprompted slices are trained: their loss reaches the adapters
    outputs[0][:, 1:, 2:].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for module in adapter_modules(network.sam)
               for p in module.parameters())


def test_network_on_a_hippocampus_case(loaded_network):
    """A real image and its label as stage-1 masks: forward and backward through both passes."""
    source = hippocampus_source()
    case = list_cases(source)[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")))
    labelled = np.nonzero(label.any(axis=(1, 2)))[0]
    start = labelled[0] - 2  # 8 slices starting just before the structure: the first two have no label
    assert start >= 0
    image, label = image[start:start + 8].astype(np.float32), label[start:start + 8]
    image = (image - image.mean()) / image.std()
    one_hot = np.stack([label == k for k in (1, 2)]).astype(np.float32)
    x = torch.from_numpy(np.concatenate([image[None], one_hot]))[None]  # (1, 3, 8, 52, 36)
    target = torch.from_numpy(label.astype(np.int64))[None]

    # every slice prompted: slices left to memory decide presence themselves (see the test above)
    net = variant(loaded_network, training_prompt_dropout=0.0).train()
    outputs = net(x).passes
    assert len(outputs) == 2 and all(o.shape == (1, 3, 8) + image.shape[1:] for o in outputs)
    first = outputs[0]
    for k in (1, 2):
        absent = ~torch.from_numpy(one_hot[k - 1].any(axis=(1, 2)))
        assert absent.any()
        assert (first[0, k, absent] == ABSENT_LOGIT).all()
    loss = sum(F.cross_entropy(o, target) for o in outputs)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# --- checkpoints ---

def test_checkpoint_loads_into_the_adapted_network(loaded_network, tiny_state_dict):
    own = loaded_network.sam.state_dict()
    for key, value in tiny_state_dict.items():
        assert torch.equal(own[key], value), key
    for adapter in adapter_modules(loaded_network):
        assert not adapter.up.weight.any()


def test_weights_reference_sam2s_frozen_part_and_load_it_from_the_file(loaded_network, tiny_checkpoint):
    """After an official checkpoint, the state dict holds what trains and a reference to the file, which brings
    the rest back: a fresh network (other random weights) then equals the loaded one tensor for tensor."""
    weights = loaded_network.state_dict()
    full = torch.nn.Module.state_dict(loaded_network)
    trainable = {name for name, p in loaded_network.named_parameters() if p.requires_grad}
    assert trainable <= weights.keys() and REFERENCE_KEY in weights
    assert not any(key.startswith("sam.image_encoder.trunk.") and ".adapter." not in key for key in weights)
    stored = sum(v.numel() for k, v in weights.items() if k != REFERENCE_KEY)
    assert stored < 0.1 * sum(v.numel() for v in full.values())
    fresh = make_network(seed=5)
    assert not torch.equal(torch.nn.Module.state_dict(fresh)["sam.no_mem_embed"], full["sam.no_mem_embed"])
    fresh.load_state_dict(weights)
    for key, value in torch.nn.Module.state_dict(fresh).items():
        assert torch.equal(value, full[key]), key
    assert fresh.sam2_reference == loaded_network.sam2_reference
    with pytest.raises(RuntimeError, match="missing keys.*prompt_gate_logits|missing keys.*adapter"):
        make_network().load_state_dict({k: v for k, v in weights.items() if ".adapter." not in k})


def test_weights_find_their_sam2_file_through_the_variable_or_refuse_naming_it(tmp_path, tiny_checkpoint,
                                                                              monkeypatch):
    """On another machine the file is elsewhere: RFMEDSAM2_SAM2_CHECKPOINT finds it if it is the same file;
    without it, or with another file, loading stops with one line naming the file and its checksum."""
    import shutil
    moved = tmp_path / "trained_with" / "sam2.1_hiera_tiny.pt"
    moved.parent.mkdir()
    shutil.copy(tiny_checkpoint, moved)
    net = make_network()
    net.load_sam2_checkpoint(moved)
    weights = net.state_dict()
    elsewhere = tmp_path / "elsewhere.pt"
    moved.rename(elsewhere)
    other_file = save_official_format_checkpoint(tmp_path / "other" / "sam2.1_hiera_tiny.pt", "tiny", seed=7)

    monkeypatch.delenv("RFMEDSAM2_SAM2_CHECKPOINT", raising=False)
    with pytest.raises(SAM2CheckpointError) as error:
        make_network().load_state_dict(weights)
    message = str(error.value)
    assert "\n" not in message and str(moved) in message and "does not exist" in message
    assert net.sam2_reference.sha256[:16] in message and "RFMEDSAM2_SAM2_CHECKPOINT is not set" in message
    monkeypatch.setenv("RFMEDSAM2_SAM2_CHECKPOINT", str(other_file))
    with pytest.raises(SAM2CheckpointError, match=f"{other_file} is another file"):
        make_network().load_state_dict(weights)
    monkeypatch.setenv("RFMEDSAM2_SAM2_CHECKPOINT", str(elsewhere))
    found = make_network()
    found.load_state_dict(weights)
    assert torch.equal(torch.nn.Module.state_dict(found)["sam.no_mem_embed"],
                       torch.nn.Module.state_dict(net)["sam.no_mem_embed"])


def assert_refused(net: RFMedSAM2Network, path: Path, *phrases: str) -> str:
    before = {k: v.clone() for k, v in net.sam.state_dict().items()}
    with pytest.raises(SAM2CheckpointError) as error:
        net.load_sam2_checkpoint(path)
    message = str(error.value)
    assert isinstance(error.value, RuntimeError)
    assert "\n" not in message and str(path) in message and "tiny" in message
    for phrase in phrases:
        assert phrase in message, message
    after = net.sam.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint was partly loaded"
    return message


def test_refuses_missing_file(loaded_network, checkpoint_dir):
    message = assert_refused(loaded_network, checkpoint_dir / "absent.pt", "does not exist", "sam2.1_hiera_tiny.pt")
    assert OFFICIAL_CHECKPOINT_HINT in message


def test_refuses_corrupt_file(loaded_network, checkpoint_dir):
    path = checkpoint_dir / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(loaded_network, path, "torch.load cannot read it")


def test_refuses_other_formats(loaded_network, checkpoint_dir, tiny_state_dict):
    path = checkpoint_dir / "lightning.pt"
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, path)
    assert_refused(loaded_network, path, "not in the official format")


def test_refuses_sam1_checkpoint(loaded_network, checkpoint_dir):
    path = checkpoint_dir / "sam_vit_b.pth"
    torch.save({"model": {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
                          "image_encoder.blocks.0.norm1.weight": torch.zeros(768),
                          "prompt_encoder.no_mask_embed.weight": torch.zeros(1, 256),
                          "mask_decoder.iou_token.weight": torch.zeros(1, 256)}}, path)
    assert_refused(loaded_network, path, "this is a SAM 1 checkpoint")


def test_refuses_other_model_size(loaded_network, checkpoint_dir):
    path = save_official_format_checkpoint(checkpoint_dir / "sam2.1_hiera_small.pt", "small")
    assert_refused(loaded_network, path, "looks like a SAM 2 small checkpoint", "16 blocks")


def test_refuses_missing_and_unexpected_keys(loaded_network, checkpoint_dir, tiny_state_dict):
    state_dict = dict(tiny_state_dict)
    del state_dict["sam_mask_decoder.iou_token.weight"], state_dict["no_mem_embed"]
    state_dict["extra_head.weight"] = torch.zeros(3)
    path = checkpoint_dir / "edited.pt"
    torch.save({"model": state_dict}, path)
    assert_refused(loaded_network, path, "2 missing key(s) (no_mem_embed, sam_mask_decoder.iou_token.weight)",
                   "1 unexpected key(s) (extra_head.weight)")


def test_refuses_wrong_shapes(loaded_network, checkpoint_dir, tiny_state_dict):
    state_dict = dict(tiny_state_dict, no_mem_embed=torch.zeros(1, 1, 128))
    path = checkpoint_dir / "reshaped.pt"
    torch.save({"model": state_dict}, path)
    assert_refused(loaded_network, path, "no_mem_embed (1, 1, 128) instead of (1, 1, 256)")


# --- starting at the prompt ---

@pytest.mark.parametrize("seed", [0, 7])
def test_untrained_refiner_returns_its_prompt_whatever_sam2_weights(seed):
    """With the gate at its start, every pass's class logits are the stage-1 masks' (+-10 against background 0)
    moved by at most GATE_START of SAM 2's departure, so the argmax is stage 1's segmentation, for any SAM 2
    weights (two random seeds) and in both modes."""
    from sam2.modeling.sam2_base import NO_OBJ_SCORE
    from nnunetv2_rfmedsam.model.network import GATE_START, PROMPT_LOGIT
    net = make_network(seed=seed, start_at_prompt=True)
    x = synthetic_patch()
    stage1 = x[:, 1:]
    expected_argmax = torch.where(stage1.sum(1) > 0, stage1.argmax(1) + 1, 0)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        with torch.no_grad():
            passes = net(x, return_all_passes=True).passes
        for logits in passes:
            departure = (logits[:, 1:] - (2 * stage1 - 1) * PROMPT_LOGIT).abs()
            assert departure.max() <= GATE_START * (abs(NO_OBJ_SCORE) + PROMPT_LOGIT)
            assert torch.equal(logits.argmax(1), expected_argmax)


def test_the_gates_start_keeps_stage1s_label_map_for_sam2_logits_below_1e4():
    """GATE_START's claim: at the start, SAM 2 logits of any magnitude below ~1e4 (NO_OBJ_SCORE, -1024, included)
    leave stage 1's label map as it is; beyond the bound they would not."""
    from sam2.modeling.sam2_base import NO_OBJ_SCORE
    net = make_network(start_at_prompt=True)
    stage1 = synthetic_patch()[:1, 1:, :3]  # (1, K, D, H, W): both classes, and slices without either
    expected = torch.where(stage1.sum(1) > 0, stage1.argmax(1) + 1, 0)
    extremes = torch.tensor([NO_OBJ_SCORE, -9980.0, -100.0, 0.0, 100.0, 1024.0, 9980.0])
    choice = torch.randint(len(extremes), stage1.shape, generator=torch.Generator().manual_seed(0))
    sam_logits = extremes[choice].reshape(-1, *stage1.shape[2:])  # one object per class
    for refinement_pass in range(net.settings.refinement_passes):
        logits = net._class_logits(sam_logits, stage1, refinement_pass)
        assert torch.equal(logits.argmax(1), expected)
    against_every_prompt = torch.where(stage1 > 0, -2e4, 2e4).reshape(sam_logits.shape)
    assert (net._class_logits(against_every_prompt, stage1, 0).argmax(1) != expected).all()


def test_gates_stay_between_prompt_and_sam2_and_older_checkpoints_load_theirs(tiny_checkpoint):
    """The gates are the sigmoid of their logits, so no logit puts them outside [0, 1]; they are read-only and set
    by value (clamped into GATE_RANGE). A checkpoint written with the gates themselves (`prompt_gates`, any
    value) loads, strictly, with each gate clamped into GATE_RANGE."""
    from nnunetv2_rfmedsam.model.network import GATE_RANGE, GATE_START
    net = make_network(start_at_prompt=True)
    torch.testing.assert_close(net.prompt_gates, torch.full((2, NUM_CLASSES), GATE_START))
    with torch.no_grad():
        net.prompt_gate_logits.copy_(torch.tensor([[-1e4, -3.0], [3.0, 1e4]]))
    assert ((net.prompt_gates >= 0) & (net.prompt_gates <= 1)).all()
    with pytest.raises(AttributeError):
        net.prompt_gates = torch.ones(2, NUM_CLASSES)
    net.set_prompt_gates(0.6)
    torch.testing.assert_close(net.prompt_gates, torch.full((2, NUM_CLASSES), 0.6))
    net.load_sam2_checkpoint(tiny_checkpoint)
    older = net.state_dict()
    del older["prompt_gate_logits"]
    older["prompt_gates"] = torch.tensor([[-0.4, 0.0], [0.3, 1.7]])
    loaded = make_network(seed=3, start_at_prompt=True)
    loaded.load_state_dict(older)
    torch.testing.assert_close(loaded.prompt_gates, torch.tensor([[GATE_RANGE[0], GATE_RANGE[0]],
                                                                  [0.3, GATE_RANGE[1]]]))


def test_the_gate_learns_and_the_plain_refiner_has_none(tiny_checkpoint):
    net = make_network(start_at_prompt=True)
    net.load_sam2_checkpoint(tiny_checkpoint)
    net.train()
    x = synthetic_patch()
    target = torch.where(x[:, 1:].sum(1) > 0, x[:, 1:].argmax(1) + 1, 0)
    loss = sum(F.cross_entropy(o, target) for o in net(x).passes)
    loss.backward()
    assert net.prompt_gate_logits.grad is not None and net.prompt_gate_logits.grad.abs().sum() > 0
    assert make_network(start_at_prompt=False).prompt_gates is None


def test_presence_loss_reaches_the_object_score_head(tiny_checkpoint):
    from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss, presence_targets
    net = make_network()
    net.load_sam2_checkpoint(tiny_checkpoint)
    net.train()
    x = synthetic_patch()
    target = torch.where(x[:, 1:].sum(1) > 0, x[:, 1:].argmax(1) + 1, 0)[:, None]
    presence = presence_targets(target, NUM_CLASSES)
    assert presence[:, 1].tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]] and presence[1, 0].tolist() == [1, 1, 1, 0]

    def mask_loss(output, target):
        return output.sum() * 0
    output = net(x)
    assert output.object_scores[0].shape == (2, NUM_CLASSES, 4)
    RefinementPassesLoss(mask_loss, presence_weight=1.0)(output, target).backward()
    head = net.sam.sam_mask_decoder.pred_obj_score_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert net.sam.sam_mask_decoder.obj_score_token.weight.grad.abs().sum() > 0
    frozen = make_network(presence_loss_weight=0.0)
    assert not any(p.requires_grad for p in frozen.sam.sam_mask_decoder.pred_obj_score_head.parameters())


def test_box_jitter_is_capped_at_sam2s_bound():
    from nnunetv2_rfmedsam.model.prompts import BOX_NOISE_BOUND
    boxes = torch.tensor([[0.0, 0.0, 511.0, 511.0]]).repeat(500, 1) + torch.tensor([100.0, 100, 100, 100])
    present = torch.ones(500, dtype=torch.bool)
    jittered = jitter_boxes(boxes, present, 0.5, (1024, 1024), torch.Generator().manual_seed(0))
    shift = (jittered - boxes).abs()
    assert shift.max() <= 20 + 1e-4 and shift.max() > 15  # 0.5 of a 512 side would be 256
    assert BOX_NOISE_BOUND * 1024 == 20


def test_no_memory_networks_load_checkpoints_that_carry_memory_adapters():
    """Earlier no-memory checkpoints carry untrained memory-attention adapters; they load, other extras do not."""
    with_adapters = make_network().state_dict()
    assert any(k.startswith("sam.memory_attention.") and ".adapter." in k for k in with_adapters)
    without_memory = make_network(use_memory=False)
    without_memory.load_state_dict(with_adapters)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        without_memory.load_state_dict(dict(with_adapters, **{"sam.unknown.weight": torch.zeros(1)}))
