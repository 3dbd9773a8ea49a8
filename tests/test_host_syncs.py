"""Stage 2 makes no slice wait for the device: what Python decides is read once per volume (host_syncs.py).

Counted on the CPU with a TorchFunctionMode, on the refiner of random weights: the difference between a volume of
12 slices and one of 6 is what each slice costs, for 2 and for 6 classes. Budget: no read from the device and no
copy of Python data to it per slice in the project's code; per volume, two reads (the finite-intensity check and
where the stage-1 masks are present). sam2's own memory attention copies one small list of frame distances per
slice (`_prepare_memory_conditioned_features`), which is counted and stated apart.
"""
from __future__ import annotations

import pytest
import torch

from nnunetv2_rfmedsam.host_syncs import HostSyncCounter
from nnunetv2_rfmedsam.interactive.propagation import SlicePrompt, propagate_object
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
from nnunetv2_rfmedsam.model.refinement import encode_slices

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(model_size="tiny", image_size=64, adapter_width=32, refinement_passes=2, slices_per_patch=4,
                use_memory=True)
SAM2_CODE = "/sam2/"
PER_VOLUME_READS = 2


def network(classes: int) -> RFMedSAM2Network:
    torch.manual_seed(0)
    return RFMedSAM2Network(input_channels=1 + classes, num_classes=classes + 1, **SETTINGS).eval()


def volume(classes: int, depth: int) -> torch.Tensor:
    """One image channel and the stage-1 masks: every class present on every slice but the first and the last,
    each class on its own rows, one class absent from slice 2 (so that slices differ in their groups)."""
    generator = torch.Generator().manual_seed(depth)
    x = torch.zeros(1, 1 + classes, depth, 20, 24)
    x[:, 0] = torch.randn(depth, 20, 24, generator=generator)
    for k in range(classes):
        x[:, 1 + k, 1:depth - 1, 2 + 2 * k:5 + 2 * k, 3:15] = 1
    x[:, 1, 2] = 0
    return x


def counted(run) -> HostSyncCounter:
    with torch.no_grad(), HostSyncCounter() as syncs:
        run()
    return syncs


@pytest.mark.parametrize("classes", [2, 6])
def test_whole_volume_prediction_reads_nothing_per_slice(classes):
    net = network(classes)
    net(volume(classes, 6))  # device constants are copied once, by the first forward
    short, long = (counted(lambda: net(volume(classes, depth))) for depth in (6, 12))
    per_slice = {kind: (long.count(kind, outside=SAM2_CODE) - short.count(kind, outside=SAM2_CODE)) / 6
                 for kind in ("read", "copy")}
    sam2_copies = (long.count("copy") - long.count("copy", outside=SAM2_CODE)) / 10  # slices 1-10 are walked
    print(f"{classes} classes: per slice {per_slice} in the project's code, {sam2_copies:.1f} copies in sam2's; "
          f"per volume {long.reads} reads: {long.by_line()}")
    assert per_slice == {"read": 0, "copy": 0}, long.by_line()
    assert long.count("read", outside=SAM2_CODE) == PER_VOLUME_READS, long.by_line()
    assert long.count("read") == PER_VOLUME_READS  # sam2 reads nothing back either
    assert sam2_copies <= 1


def test_interactive_propagation_reads_nothing_per_slice():
    """A session's propagation from a box on one slice: the slices it walks cost no read and no copy of the
    project's; the result comes back in one read (`Track.logits`)."""
    net = network(1)
    sam = net.sam
    prompts = {3: SlicePrompt(box=(3.0, 2.0, 15.0, 9.0))}
    runs = {}
    for depth in (6, 12):
        x = volume(1, depth)
        features = encode_slices(sam, net.sam_frames(x[:, :1]), depth)
        propagate_object(sam, features, prompts, (20, 24))
        runs[depth] = counted(lambda: propagate_object(sam, features, prompts, (20, 24)).logits((depth, 20, 24)))
    reads = {depth: run.count("read", outside=SAM2_CODE) for depth, run in runs.items()}
    copies = {depth: run.count("copy", outside=SAM2_CODE) for depth, run in runs.items()}
    print(f"propagation: reads {reads}, copies {copies} (6 and 12 slices): {runs[12].by_line()}")
    assert reads[12] == reads[6] == 1
    assert copies[12] == copies[6]  # the box's, on its one slice
