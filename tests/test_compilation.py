"""Stage 2 compiles what repeats: SAM 2's per-slice modules, not the walk through the slices (model/compilation.py).

Dynamo is traced for real, with a counting backend that runs each captured graph as it is (inductor's code
generation is the compiler's business and takes minutes on the CPU). `fullgraph=True` makes any graph break inside
a compiled module an error, so breaks are 0 whatever the number of slices; the graphs (compiles and recompiles) are
counted per module on real hippocampus volumes and must stop growing once the memory bank is full.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import TEST_SAM2_IMAGE_SIZE
from nnunetv2_rfmedsam.model import compilation
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
from nnunetv2_rfmedsam.whole_volume_prediction import predict_whole_volume
from test_whole_volume import hippocampus_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# dynamo's default recompile limit: a module compiled more often than this runs eagerly from then on
RECOMPILE_LIMIT = 8


def gated_network() -> RFMedSAM2Network:
    torch.manual_seed(0)
    network = RFMedSAM2Network(3, 3, image_size=TEST_SAM2_IMAGE_SIZE, slices_per_patch=4).eval()
    network.set_prompt_gates(0.6)  # SAM 2's part shows in the output
    return network


def compile_counted(network: RFMedSAM2Network, monkeypatch) -> dict[str, CompileCounter]:
    """Compile the network's per-slice step as stage 2 does, one counting backend per module."""
    counters = {}
    for name in compilation.PER_SLICE_MODULES:
        counters[name] = CompileCounter()
        monkeypatch.setattr(compilation, "PER_SLICE_MODULES", (name,))
        network.compile_per_slice_step(backend=counters[name], fullgraph=True)
    monkeypatch.undo()
    return counters


def test_the_per_slice_step_compiles_without_breaks_and_stops_recompiling(monkeypatch):
    volume = hippocampus_volume(slices=30)
    network = gated_network()
    with torch.no_grad():
        expected = network(volume)
    counters = compile_counted(network, monkeypatch)
    assert compilation.is_compiled(network.sam)
    graphs = {}
    # a larger limit than dynamo's, so that a module recompiled too often is counted rather than left eager
    with torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
        for slices in (6, 9, 12, 20, 30):
            compiled = network(volume[:, :, :slices])
            graphs[slices] = {name: counter.frame_count for name, counter in counters.items()}
    print("graphs per module after volumes of", graphs)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-5)
    # SAM 2's memory reaches 16 slices back: past that, no new layout, so no new graph
    assert graphs[30] == graphs[20], graphs
    assert all(1 <= count <= RECOMPILE_LIMIT // 2 for count in graphs[30].values()), graphs[30]

def test_nnunet_predictors_compile_gives_the_refiner_back_with_its_step_compiled(monkeypatch):
    """Under nnUNet_compile=t nnU-Net's predictor wraps its network in torch.compile; stage 2's whole-volume
    prediction compiles SAM 2's modules instead, with the same result."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    counter = CompileCounter()
    monkeypatch.setattr(compilation, "DEFAULT_BACKEND", counter)
    network = gated_network()
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    predictor.network, predictor.allowed_mirroring_axes = network, None
    volume = hippocampus_volume(slices=10)[0]
    expected = predict_whole_volume(predictor, volume)
    predictor.network = torch.compile(network)  # what nnU-Net's predictor does
    with torch._dynamo.config.patch(recompile_limit=64):
        compiled = predict_whole_volume(predictor, volume)
    assert predictor.network is network and compilation.is_compiled(network.sam)
    assert counter.frame_count >= len(compilation.PER_SLICE_MODULES)
    torch.testing.assert_close(compiled, expected, atol=2 ** -6, rtol=0)  # half precision, as nnU-Net keeps logits


def test_a_training_step_through_the_compiled_modules_gives_the_same_gradients(monkeypatch):
    """As the trainer runs under nnUNet_compile=t: the compiled modules' backward gives every trainable parameter
    the gradient of the modules as written."""
    volume = hippocampus_volume(slices=16)
    patch = volume[:, :, 8:12]  # a training patch of 4 slices through both structures
    target = (patch[:, 1:2] + 2 * patch[:, 2:3]).clamp(max=2)

    def gradients(network: RFMedSAM2Network) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)  # the same box jitter, dropped prompts and clicks
        network.train()
        network.zero_grad()
        network.set_click_targets(target)
        output = network(patch)
        loss = sum(logits.square().mean() for logits in output.passes) + \
            sum(scores.square().mean() for scores in output.object_scores)
        loss.backward()
        return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}

    network = gated_network()
    expected = gradients(network)
    counters = compile_counted(network, monkeypatch)
    with torch._dynamo.config.patch(recompile_limit=64):
        compiled = gradients(network)
    assert all(counter.frame_count >= 1 for counter in counters.values())
    assert compiled.keys() == expected.keys() and len(expected) > 10
    for name, gradient in expected.items():
        torch.testing.assert_close(compiled[name], gradient, atol=1e-5, rtol=1e-4, msg=name)
