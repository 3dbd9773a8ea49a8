"""A floor that training cannot break: stage 2's prompt gates stay in [0, 1] through training, so the cascade
stays between stage 1's mask and SAM 2's logits and never extrapolates beyond either.

Stage 2's network trains as nnUNetTrainerRFMedSAM2 trains it (its AdamW parameter groups, nnU-Net's Dice + CE on
every pass plus the presence loss, gradient clipping), at a learning rate far above the trainer's, with random
SAM 2 weights, on real hippocampus cases cropped around the structure. Stage 1 is stood in for by the ground truth
eroded in-plane: a deliberately imperfect prompt whose Dice is known without training a UNet.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from scipy import ndimage

from nnunetv2_rfmedsam.model.network import PROMPT_GATE_LOGITS, RFMedSAM2Network
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss
from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import optimizer_parameter_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = 2  # hippocampus: anterior, posterior
CROP = (8, 40, 32)  # slices, rows, columns around the hippocampus
SETTINGS = dict(model_size="tiny", image_size=64, slices_per_patch=CROP[0])
# ~100x the trainer's 3e-4: gates without a bound leave [0, 1] within these steps
LEARNING_RATE = 3e-2
WEIGHT_DECAY = 1e-2  # the trainer's
STEPS = 24
TRAINING_CASES, HELD_BACK_CASES = 3, 2


def cropped_case(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A hippocampus image (z-scored) and its label map, both (CROP), centred on the labelled structure."""
    source = hippocampus_source()
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")))
    image = (image - image.mean()) / image.std()
    centre = np.round(np.argwhere(label > 0).mean(axis=0)).astype(int)
    starts = [int(np.clip(c - size // 2, 0, extent - size)) for c, size, extent in zip(centre, CROP, label.shape)]
    window = tuple(slice(start, start + size) for start, size in zip(starts, CROP))
    return torch.from_numpy(image[window].astype(np.float32)), torch.from_numpy(label[window].astype(np.int64))


def imperfect_stage1(label: torch.Tensor) -> torch.Tensor:
    """The label map with each class eroded by one voxel in-plane: a stage-1 result that misses the borders."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    eroded = np.zeros(label.shape, dtype=np.int64)
    for k in range(1, CLASSES + 1):
        eroded[ndimage.binary_erosion(label.numpy() == k, in_plane)] = k
    return torch.from_numpy(eroded)


def network_input(image: torch.Tensor, stage1: torch.Tensor) -> torch.Tensor:
    """(1, 1 + K, D, H, W): the image, then one mask per foreground class, as nnU-Net's cascade gives them."""
    masks = [(stage1 == k).float() for k in range(1, CLASSES + 1)]
    return torch.stack([image, *masks])[None]


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean Dice of the foreground classes."""
    scores = [2 * ((prediction == k) & (truth == k)).sum() / ((prediction == k).sum() + (truth == k).sum())
              for k in range(1, CLASSES + 1)]
    return float(torch.stack(scores).mean())


def nnunet_loss() -> RefinementPassesLoss:
    """nnUNetTrainerRFMedSAM2's loss: nnU-Net's Dice + CE as its trainer builds it (batch_dice as planned for
    hippocampus' 3d_fullres, which stage 2 shares), on every pass, plus the presence loss."""
    dice_and_ce = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                 weight_ce=1, weight_dice=1, ignore_label=None,
                                 dice_class=MemoryEfficientSoftDiceLoss)
    return RefinementPassesLoss(dice_and_ce, presence_weight=1.0)


def test_the_gate_logits_train_without_weight_decay():
    """AdamW's decoupled decay would pull a gate logit to 0, its gate to 0.5: the logits have a group without it,
    and every other trainable parameter keeps the trainer's decay."""
    torch.manual_seed(0)
    network = RFMedSAM2Network(input_channels=1 + CLASSES, num_classes=CLASSES + 1, **SETTINGS)
    groups = optimizer_parameter_groups(network, WEIGHT_DECAY)
    undecayed = [p for group in groups if group["weight_decay"] == 0 for p in group["params"]]
    assert len(undecayed) == 1 and undecayed[0] is getattr(network, PROMPT_GATE_LOGITS)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in network.parameters() if p.requires_grad)
    assert sorted(group["weight_decay"] for group in groups) == [0.0, WEIGHT_DECAY]
    plain = RFMedSAM2Network(input_channels=1 + CLASSES, num_classes=CLASSES + 1, start_at_prompt=False, **SETTINGS)
    assert [group["weight_decay"] for group in optimizer_parameter_groups(plain, WEIGHT_DECAY)] == [WEIGHT_DECAY]


def test_training_keeps_the_gates_in_bounds_and_the_cascade_at_or_above_stage1():
    cases = list_cases(hippocampus_source())[:TRAINING_CASES + HELD_BACK_CASES]
    crops = [cropped_case(case) for case in cases]
    training, held_back = crops[:TRAINING_CASES], crops[TRAINING_CASES:]
    torch.manual_seed(0)
    network = RFMedSAM2Network(input_channels=1 + CLASSES, num_classes=CLASSES + 1, **SETTINGS)
    optimizer = torch.optim.AdamW(optimizer_parameter_groups(network, WEIGHT_DECAY), lr=LEARNING_RATE)
    loss_function = nnunet_loss()

    network.train()
    start = network.prompt_gates.detach().clone()
    for step in range(STEPS):
        image, label = training[step % len(training)]
        target = label[None, None].float()
        optimizer.zero_grad(set_to_none=True)
        network.set_click_targets(target)
        loss = loss_function(network(network_input(image, imperfect_stage1(label))), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        gates = network.prompt_gates
        assert ((gates >= 0) & (gates <= 1)).all(), f"step {step}: gates {gates.tolist()}"
    assert not torch.equal(network.prompt_gates, start), "the gates did not train: the bound was never tested"

    network.eval()
    stage1_dice, cascade_dice = [], []
    with torch.no_grad():
        for image, label in held_back:
            stage1 = imperfect_stage1(label)
            cascade = network(network_input(image, stage1))[0].argmax(0)
            stage1_dice.append(dice(stage1, label))
            cascade_dice.append(dice(cascade, label))
    assert np.mean(cascade_dice) >= np.mean(stage1_dice), (cascade_dice, stage1_dice)
