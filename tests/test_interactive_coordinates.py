"""Where a person's clicks and boxes land: from the original image's voxels through nnU-Net's preprocessing to SAM 2's
prompt encoder and back to the original grid, on the hippocampus plans and on copies of them made anisotropic and
transposed; and from napari's world coordinates to those voxels.

The sessions use a randomly initialised tiny refiner built from the plans (no training): what is checked holds
whatever the weights. The image is a real hippocampus case inside a border of zeros, so that nnU-Net's crop to the
nonzero region moves it. Expected positions are computed here from the image and the plans alone: a voxel
(slice, y, x) is transposed (`transpose_forward`), moved by the crop, its centre scaled to the resampled size
(voxel centres to voxel centres) and moved by the in-plane padding to the patch size, giving (d, h, w) on the
network grid; SAM 2 then gets (w * S / W, h * S / H) on an (H, W) slice, as sam2's predictors scale a user's
coordinates, a box as its two corners (labels 2 and 3) and clicks with labels 1 and 0.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_NAME, PLANS
from nnunetv2_rfmedsam.interactive import InteractiveSession, PromptError
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2

CLASS = 1
CONFIGURATION = "3d_rfmedsam2"
# zeros before and after the real image on each axis: nnU-Net crops them away
BORDER = ((2, 1), (3, 5), (4, 2))
SPACING = (1.0, 1.0, 1.0)  # the hippocampus images'
# edits of the planned configuration (spacing in the network's axis order) and of the plans
VARIANTS = {
    "hippocampus": ({}, {}),
    # slices 3x thicker, y finer, x coarser: nnU-Net resamples the slice axis separately (anisotropy 3.75 > 3)
    "anisotropic": ({"spacing": [3.0, 0.8, 1.25]}, {}),
    # the network runs along the image's x axis, its slices resampled in-plane
    "transposed": ({"spacing": [1.0, 2.0, 0.7]}, {"transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0]}),
}
# a disk of this radius (network-grid pixels) around a positive click is what the stand-in for a trained SAM 2 finds
DISK_RADIUS = 3.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Seen(Exception):
    """Raised by a hook once it has what it came for: the rest of the propagation is not needed."""


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    source = hippocampus_source()
    path = source / "imagesTr" / f"{list_cases(source)[0]}_0000.nii.gz"
    return np.pad(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), BORDER)


@pytest.fixture(scope="module")
def planned(planned_workspace):
    preprocessed = planned_workspace["root"] / "preprocessed" / DATASET_NAME
    return (json.loads((preprocessed / f"{PLANS}.json").read_text()),
            json.loads((preprocessed / "dataset.json").read_text()))


@pytest.fixture(scope="module")
def sessions(planned, image):
    """A session per variant, the image set, built on first use; one network (the variants share its settings)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans, dataset_json = planned
    torch.manual_seed(0)
    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    network = nnUNetTrainerRFMedSAM2.build_network_architecture(manager, configuration, 1 + 2, 3, False)
    built = {}

    def session_of(variant: str) -> InteractiveSession:
        if variant not in built:
            configuration_edit, plans_edit = VARIANTS[variant]
            edited = copy.deepcopy(plans)
            edited.update(plans_edit)
            edited["configurations"][CONFIGURATION].update(configuration_edit)
            plans_manager = PlansManager(edited)
            session = InteractiveSession(network, plans_manager, plans_manager.get_configuration(CONFIGURATION),
                                         dataset_json)
            session.set_image(image, spacing=SPACING)
            built[variant] = session
        built[variant].reset()
        return built[variant]

    return session_of


def expected_grid(voxel, image: np.ndarray, session: InteractiveSession) -> tuple[np.ndarray, tuple[int, ...]]:
    """Where nnU-Net's preprocessing puts the centre of an original voxel (slice, y, x): continuous (d, h, w) on the
    padded network grid, and that grid's shape; from the image and the plans alone."""
    order = list(session.plans_manager.transpose_forward)
    nonzero = np.argwhere(image != 0)
    first, last = nonzero.min(axis=0)[order], nonzero.max(axis=0)[order]
    cropped = last - first + 1
    resampled = np.round(cropped * np.array(SPACING)[order] / np.array(session.configuration_manager.spacing))
    in_plane_patch = np.array(session.configuration_manager.patch_size[1:])
    padding = np.maximum(in_plane_patch - resampled[1:], 0)
    start = np.array([0, *(padding // 2)])
    grid_shape = (int(resampled[0]), *(int(s) for s in resampled[1:] + padding))
    return (np.array(voxel, dtype=float)[order] - first + 0.5) * resampled / cropped - 0.5 + start, grid_shape


def in_sam_frame(grid_position, grid_shape, size: int) -> tuple[float, float]:
    """(x, y) in SAM 2's size x size frame of a grid position (d, h, w) on a grid (D, H, W)."""
    _, h, w = grid_position
    return w * size / grid_shape[2], h * size / grid_shape[1]


def kept_corners(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last voxel of the region nnU-Net keeps (its crop to the nonzero voxels)."""
    nonzero = np.argwhere(image != 0)
    return nonzero.min(axis=0), nonzero.max(axis=0)


def interior_voxel(image: np.ndarray, session: InteractiveSession) -> tuple[float, float, float]:
    """A click inside the image, off the voxel centres in-plane, on the slice nearest to a network slice's centre
    (a network slice spans several image slices where the slice axis is resampled)."""
    first, last = kept_corners(image)
    centre = (first + last) // 2

    def off_centre(s):
        d = session.image.to_network_grid((s, *centre[1:]))[0]
        return abs(d - round(d))

    slice_index = min(range(centre[0] - 2, centre[0] + 3), key=off_centre)
    return float(slice_index), centre[1] + 0.3, centre[2] - 0.4


# --- the network grid ---

@pytest.mark.parametrize("variant", VARIANTS)
def test_voxels_map_to_the_network_grid_as_nnunet_preprocesses(sessions, image, variant):
    session = sessions(variant)
    first, last = kept_corners(image)
    expected_first, grid_shape = expected_grid(first, image, session)
    assert session.image.grid_shape == grid_shape
    for voxel in (first, last, (first[0], last[1], first[2]), interior_voxel(image, session)):
        np.testing.assert_allclose(session.image.to_network_grid(voxel), expected_grid(voxel, image, session)[0],
                                   atol=1e-9, err_msg=f"voxel {voxel}")
    # the kept region's corners are the corners of the grid's content: exactly where nothing is resampled, else
    # symmetric about its centre
    expected_last = expected_grid(last, image, session)[0]
    content = [(s.start, s.stop - 1) for s in session.image.content]
    np.testing.assert_allclose((expected_first + expected_last) / 2, [(a + b) / 2 for a, b in content])
    if variant == "hippocampus":
        np.testing.assert_array_equal(session.image.to_network_grid(first), [a for a, _ in content])
        np.testing.assert_array_equal(session.image.to_network_grid(last), [b for _, b in content])
    # voxels in the cropped border, on each axis and side
    for axis in range(3):
        for outside in (first[axis] - 1, last[axis] + 1):
            voxel = np.array(first, dtype=float)
            voxel[axis] = outside
            assert session.image.to_network_grid(voxel) is None, voxel


@pytest.mark.parametrize("variant", VARIANTS)
def test_points_and_boxes_become_network_grid_prompts(sessions, image, variant):
    session = sessions(variant)
    slice_index, y, x = interior_voxel(image, session)
    (d, h, w), _ = expected_grid((slice_index, y, x), image, session)
    grid_d, point = session._grid_point((y, x, 1), int(slice_index), "test")
    assert grid_d == round(d) and point == pytest.approx((w, h, 1), abs=1e-9)

    first, last = kept_corners(image)
    with pytest.raises(PromptError, match="zero-valued border that nnU-Net crops away"):
        session._grid_point((first[1] - 1, x, 1), int(slice_index), "test")
    box = (y - 5.5, x - 4.0, y + 6.0, x + 3.5)
    whole_slice = (0, 0, image.shape[1] - 1, image.shape[2] - 1)
    if variant == "transposed":
        with pytest.raises(PromptError, match="runs along image axis 2, not along the slices of axis 0: give points"):
            session._grid_box(box, int(slice_index), "test")
        return
    corners = [expected_grid((slice_index, *corner), image, session)[0] for corner in (box[:2], box[2:])]
    assert session._grid_box(box, int(slice_index), "test") == \
        (round(d), pytest.approx((corners[0][2], corners[0][1], corners[1][2], corners[1][1]), abs=1e-9))
    # a box reaching into the border is clipped to the kept region: its corners become the region's corners
    clipped = [expected_grid((slice_index, *corner), image, session)[0] for corner in (first[1:], last[1:])]
    assert session._grid_box(whole_slice, int(slice_index), "test")[1] == \
        pytest.approx((clipped[0][2], clipped[0][1], clipped[1][2], clipped[1][1]), abs=1e-9)


# --- what reaches SAM 2 ---

def prompt_encoder_points(session: InteractiveSession) -> tuple[torch.Tensor, torch.Tensor]:
    """The points (coords (1, N, 2), labels (1, N)) SAM 2's prompt encoder gets on the first slice a propagation
    computes (the first prompted one)."""
    seen = []

    def capture(module, args, kwargs):
        seen.append(kwargs["points"])
        raise _Seen

    hook = session.network.sam.sam_prompt_encoder.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with pytest.raises(_Seen):
            session.propagate()
    finally:
        hook.remove()
    coords, labels = seen[0]
    return coords.float(), labels


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompts_reach_sam2_where_the_person_put_them(sessions, image, variant):
    session = sessions(variant)
    size = session.network.settings.image_size
    slice_index, y, x = interior_voxel(image, session)
    click, _ = expected_grid((slice_index, y, x), image, session)
    grid_shape = session.image.grid_shape
    # on the same network slice: the transposed network's slices lie along the image's x
    negative = (y + 2.0, x if variant == "transposed" else x - 1.5)
    expected = [in_sam_frame(click, grid_shape, size),
                in_sam_frame(expected_grid((slice_index, *negative), image, session)[0], grid_shape, size)]
    labels = [1, 0]
    box = None
    if variant != "transposed":
        box = (y - 5.5, x - 4.0, y + 6.0, x + 3.5)
        expected = [in_sam_frame(expected_grid((slice_index, *corner), image, session)[0], grid_shape, size)
                    for corner in (box[:2], box[2:])] + expected
        labels = [2, 3] + labels
    session.add_prompt(CLASS, int(slice_index), box=box, points=[(y, x, 1), (*negative, 0)])
    assert list(session._prompts[CLASS]) == [round(click[0])]  # the network slice
    coords, received_labels = prompt_encoder_points(session)
    assert received_labels.tolist() == [labels]
    torch.testing.assert_close(coords[0], torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=0)


def disk_where_clicked(session: InteractiveSession):
    """A stand-in for a trained SAM 2 (around `_forward_sam_heads`): on a slice with a positive click, the object is
    the disk of DISK_RADIUS grid pixels around it (read from the coordinates the prompt encoder gets, as SAM 2's
    prompt encoder reads them: pixel indices of its frame); elsewhere it is absent. Its logits are the signed
    distance to the disk's edge, so that resizing SAM 2's low-resolution logits to the grid keeps the edge."""
    sam = session.network.sam
    original = sam._forward_sam_heads
    size, quarter = sam.image_size, sam.image_size // 4
    height, width = session.image.grid_shape[1:]

    def heads(*args, **kwargs):
        outputs = list(original(*args, **kwargs))
        points = kwargs.get("point_inputs")
        low_res, score = outputs[3], outputs[6]
        positive = None if points is None else points["point_coords"][points["point_labels"] == 1]
        if positive is None or len(positive) == 0:
            outputs[6] = torch.full_like(score, -10.0)
            return tuple(outputs)
        x_s, y_s = positive[0].float().tolist()
        # SAM 2 reads a point as a pixel index of its frame; that frame is the grid slice resized (pixel centres
        # to pixel centres), as are its low-resolution logits
        click_w, click_h = (x_s + 0.5) * width / size - 0.5, (y_s + 0.5) * height / size - 0.5
        centres = torch.arange(quarter, dtype=torch.float32) + 0.5
        w, h = centres * width / quarter - 0.5, centres * height / quarter - 0.5
        distance = ((w[None, :] - click_w) ** 2 + (h[:, None] - click_h) ** 2).sqrt()
        disk = (DISK_RADIUS - distance).to(low_res.dtype).expand_as(low_res)
        outputs[0], outputs[3] = disk.expand_as(outputs[0]).clone(), disk.clone()
        outputs[6] = torch.full_like(score, 10.0)
        return tuple(outputs)

    sam._forward_sam_heads = heads
    return lambda: delattr(sam, "_forward_sam_heads")


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_positive_click_keeps_its_voxel(sessions, image, variant):
    """Through SAM 2 and back to the original grid (nnU-Net's export): the class is a disk around the click."""
    session = sessions(variant)
    slice_index, y, x = interior_voxel(image, session)
    restore = disk_where_clicked(session)
    try:
        session.add_points(CLASS, int(slice_index), [(y, x, 1)])
        mask = session.class_mask(CLASS)
    finally:
        restore()
    clicked = (int(slice_index), int(round(y)), int(round(x)))
    assert mask[clicked]
    # the disk is centred on the click, on whichever axes the network's slices lie
    centre = np.argwhere(mask).mean(axis=0)
    np.testing.assert_allclose(centre, (slice_index, y, x), atol=0.75, err_msg=f"disk centre {centre}")


# --- napari's coordinates ---

def test_napari_clicks_and_boxes_become_the_voxels_under_them(tmp_path):
    """An image with non-unit spacing and an origin away from 0, opened by the plugin's reader: what is placed at a
    voxel's world position (SimpleITK's physical point of the voxel, translate + index * scale) in the prompt
    layers, as napari's mouse modes place it (`world_to_data`), becomes that voxel's index. napari's layers are
    models without Qt: no viewer is started."""
    import napari.layers
    from nnunetv2_rfmedsam.viewer.prompt_layers import boxes_from_rectangles, clicks_from_points, image_geometry
    from nnunetv2_rfmedsam.viewer.reader import read_image_layer

    written = sitk.GetImageFromArray(np.arange(6 * 9 * 11, dtype=np.float32).reshape(6, 9, 11))
    written.SetSpacing((0.7, 1.3, 2.5))
    written.SetOrigin((5.0, -12.0, 30.0))
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(written, str(path))
    image = sitk.ReadImage(str(path))
    [(data, settings, _)] = read_image_layer(str(path))
    image_layer = napari.layers.Image(data, **settings)
    points = napari.layers.Points(ndim=3, **image_geometry(image_layer))
    rectangles = napari.layers.Shapes(ndim=3, **image_geometry(image_layer))

    def world(voxel):
        return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in voxel[::-1]])[::-1])

    voxels = [(4, 2.0, 7.0), (0, 8.0, 10.0), (5, 0.25, 3.6)]
    for voxel in voxels:
        np.testing.assert_allclose(image_layer.world_to_data(world(voxel)), voxel, atol=1e-9)
        points.add(points.world_to_data(world(voxel)))
    clicks = clicks_from_points(points.data, positive=False)
    assert [c.slice_index for c in clicks] == [v[0] for v in voxels] and not any(c.positive for c in clicks)
    np.testing.assert_allclose([(c.y, c.x) for c in clicks], [v[1:] for v in voxels], atol=1e-5)

    # a rectangle dragged from its lower right corner to its upper left one on slice 3
    corners = [(3, 7.0, 9.5), (3, 7.0, 1.0), (3, 2.0, 1.0), (3, 2.0, 9.5)]
    rectangles.add(np.array([rectangles.world_to_data(world(c)) for c in corners]), shape_type="rectangle")
    [box] = boxes_from_rectangles(rectangles.data)
    assert box.slice_index == 3
    np.testing.assert_allclose((box.y0, box.x0, box.y1, box.x1), (2.0, 1.0, 7.0, 9.5), atol=1e-5)
