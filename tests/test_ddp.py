"""Stage 2 under torch DDP, as `nnUNetv2_train -num_gpus N` runs it: two processes (gloo on the CPU), two
training steps each. DDP (nnU-Net builds it without `find_unused_parameters`) fails in the second step when a
trainable parameter got no gradient in the first, so every trainable parameter must take part in the loss,
whatever the settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import DATASET_NAME, PLANS, TEST_SAM2_IMAGE_SIZE, stage2_trainer
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases

VARIANTS = {  # name: (plans settings, slices per patch)
    "default": ({}, 2),  # the second slice runs memory attention
    "no memory": ({"use_memory": False}, 2),
    "one slice per patch": ({"slices_per_patch": 1}, 1),
    "plain refiner, no presence loss": ({"start_at_prompt": False, "presence_loss_weight": 0.0}, 2),
}


def hippocampus_patch(case_index: int, slices: int):
    """A real hippocampus image (z-scored), its label as stage-1 masks and as the target, centred slices."""
    source = hippocampus_source()
    case = list_cases(source)[case_index]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"))).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))).astype(np.float32)
    start = (image.shape[0] - slices) // 2
    image, label = image[start:start + slices], label[start:start + slices]
    image = (image - image.mean()) / image.std()
    x = torch.from_numpy(np.stack([image, label == 1, label == 2]).astype(np.float32))[None]
    return x, torch.from_numpy(label)[None, None]


def ddp_training_steps(rank: int, world_size: int, init_file: str, variants: list[str]) -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch.nn.parallel import DistributedDataParallel

    from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
    from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name in variants:
            settings, slices = VARIANTS[name]
            torch.manual_seed(0)  # DDP needs the same initial weights in every process
            network = RFMedSAM2Network(3, 3, image_size=TEST_SAM2_IMAGE_SIZE, **settings).train()
            model = DistributedDataParallel(network)
            optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3)
            loss = RefinementPassesLoss(
                DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                               weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss),
                network.settings.presence_loss_weight)
            x, target = hippocampus_patch(rank, slices)  # each process its own case, as DDP splits the batch
            for step in range(2):
                network.set_click_targets(target)
                optimizer.zero_grad()
                try:
                    loss(model(x), target).backward()
                except RuntimeError as error:
                    raise RuntimeError(f"{name}, step {step + 1}: {error}") from None
                optimizer.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variants", [list(VARIANTS)], ids=["all settings"])
def test_ddp_trains_every_setting_for_two_steps(tmp_path, variants):
    mp.spawn(ddp_training_steps, args=(2, str(tmp_path / "rendezvous"), variants), nprocs=2, join=True)


def stage2_batch_per_process(rank: int, world_size: int, init_file: str, preprocessed: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        trainer = stage2_trainer(Path(preprocessed), 0)  # as nnUNetv2_train -num_gpus builds it in each process
        trainer._set_batch_size_and_oversample()  # what initialize() does first
        sizes = [None] * world_size
        dist.all_gather_object(sizes, trainer.batch_size)
        if rank == 0:
            Path(results).write_text(json.dumps(sizes))
    finally:
        dist.destroy_process_group()


def test_three_processes_get_a_stage2_patch_each(planned_workspace, tmp_path, monkeypatch):
    """nnU-Net refuses a DDP run with fewer patches per batch than GPUs; stage 2 plans 2."""
    plans = json.loads((planned_workspace["root"] / "preprocessed" / DATASET_NAME / f"{PLANS}.json").read_text())
    assert plans["configurations"]["3d_rfmedsam2"]["batch_size"] == 2
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):  # the spawned processes inherit them
        monkeypatch.setenv(variable, planned_workspace["env"][variable])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    sizes = tmp_path / "sizes.json"
    mp.spawn(stage2_batch_per_process, args=(3, str(tmp_path / "rendezvous"),
                                             str(planned_workspace["root"] / "preprocessed" / DATASET_NAME),
                                             str(sizes)), nprocs=3, join=True)
    assert json.loads(sizes.read_text()) == [1, 1, 1]
