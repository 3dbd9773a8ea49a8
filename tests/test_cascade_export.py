"""The cascade's export to the image's grid (cascade_export.py): a refiner that starts at its prompt has its departure
from stage 1 resampled, not stage 1's label map. Here nnU-Net resamples every axis of a real hippocampus case,
given 12 mm x 2.5 mm x 2.5 mm voxels and planned at 10.5 x 3 x 3 mm (the coarse axis first, as nnU-Net transposes
it); the case is zero-padded, so nnU-Net crops it too, and has rows of zeros across the hippocampus. The logits are
the refiner's rule `prompt + gate * (sam - prompt)` on the stage-1 masks nnU-Net's preprocessing gives the network,
with "SAM 2" stage 1's masks moved by a few voxels; the predictor test runs the real refiner through nnU-Net's own
predictor.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_SAM2_IMAGE_SIZE
from nnunetv2_rfmedsam import cascade_export
from nnunetv2_rfmedsam.cascade_export import STAGE1_PROPERTY, with_stage1_prompt
from nnunetv2_rfmedsam.model.network import BACKGROUND_LOGIT, GATE_START, PROMPT_LOGIT
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.settings import NETWORK_CLASS, SAM2Settings

CASE = "case"
FILE_ENDING = ".nii.gz"
SPACING_XYZ = (12.0, 2.5, 2.5)  # SimpleITK's order; the first (x) is the coarse axis
PLANNED_SPACING = [10.5, 3.0, 3.0]  # after nnU-Net's transpose: x first
TRANSPOSE_FORWARD, TRANSPOSE_BACKWARD = [2, 0, 1], [1, 2, 0]
PAD = 2  # zero voxels around the image: nnU-Net crops them
ZERO_ROWS = slice(20, 34, 2)  # rows (the array's y) of the padded image set to 0
SAM_SHIFT = 3  # voxels by which "SAM 2" moves stage 1's masks along the last planned axis
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
                "numTraining": 1, "file_ending": FILE_ENDING}


def resampling_plans() -> dict:
    """nnU-Net plans (as its planner writes them, reduced to what prediction reads) with a 3d_rfmedsam2
    configuration at PLANNED_SPACING."""
    linear = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Resampled", "plans_name": "plans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": TRANSPOSE_FORWARD, "transpose_backward": TRANSPOSE_BACKWARD,
        "original_median_spacing_after_transp": PLANNED_SPACING, "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {}},
        "configurations": {"3d_rfmedsam2": {
            "data_identifier": "resampled", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [8, 32, 48], "spacing": PLANNED_SPACING, "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {**linear, "order": 3},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**linear, "is_seg": True},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": linear, "batch_dice": False,
            "architecture": {"network_class_name": NETWORK_CLASS, "_kw_requires_import": [],
                             "arch_kwargs": SAM2Settings(image_size=TEST_SAM2_IMAGE_SIZE).to_plans()}}}}


def with_zero_rows(image: sitk.Image) -> sitk.Image:
    """The image with every other row of ZERO_ROWS set to 0, across the hippocampus: each row reaches the border,
    so nnU-Net's nonzero mask leaves it out (inside its crop) and its preprocessing labels the stage-1 background
    there -1. Beside the foreground, that label changes what batchgenerators' argmax resampling of labels makes of
    the foreground: the planned prompt is the network's input, not the stage-1 map resampled once more."""
    array = sitk.GetArrayFromImage(image)
    array[:, ZERO_ROWS] = 0
    zeroed = sitk.GetImageFromArray(array)
    zeroed.CopyInformation(image)
    return zeroed


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The image and its label as stage 1's prediction in nnU-Net's layout, the plans' managers, and the case as
    nnU-Net's predictor preprocesses it (`run_case` with the stage-1 file)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    source = hippocampus_source()
    name = list_cases(source)[0]
    folder = tmp_path_factory.mktemp("resampled_case")
    for kind, path in (("image", source / "imagesTr" / f"{name}_0000{FILE_ENDING}"),
                       ("stage1", source / "labelsTr" / f"{name}{FILE_ENDING}")):
        image = sitk.ConstantPad(sitk.ReadImage(str(path)), [PAD] * 3, [PAD] * 3, 0)
        if kind == "image":
            image = with_zero_rows(image)
        image.SetSpacing(SPACING_XYZ)
        (folder / kind).mkdir()
        sitk.WriteImage(image, str(folder / kind / (f"{CASE}_0000{FILE_ENDING}" if kind == "image"
                                                    else f"{CASE}{FILE_ENDING}")))
    plans_manager = PlansManager(resampling_plans())
    configuration = plans_manager.get_configuration("3d_rfmedsam2")
    image_file, stage1_file = folder / "image" / f"{CASE}_0000{FILE_ENDING}", folder / "stage1" / f"{CASE}{FILE_ENDING}"
    _, planned_stage1, properties = configuration.preprocessor_class().run_case(
        [str(image_file)], str(stage1_file), plans_manager, configuration, DATASET_JSON)
    stage1 = sitk.GetArrayFromImage(sitk.ReadImage(str(stage1_file)))
    assert list(planned_stage1.shape[1:]) != list(properties["shape_after_cropping_and_before_resampling"])
    assert properties["shape_after_cropping_and_before_resampling"] != properties["shape_before_cropping"]
    assert (planned_stage1 == -1).any()
    return {"folder": folder, "image_file": image_file, "stage1_file": stage1_file, "stage1": stage1,
            "planned_stage1": planned_stage1, "properties": properties, "plans_manager": plans_manager,
            "configuration": configuration, "label_manager": plans_manager.get_label_manager(DATASET_JSON)}


def masks_of(labels: np.ndarray) -> np.ndarray:
    """A label map (1, *grid) -> one mask per foreground label (K, *grid)."""
    return np.stack([labels[0] == label for label in (1, 2)])


def planned_masks(case) -> np.ndarray:
    """The stage-1 masks of the network's input (nnU-Net's one-hot of its preprocessed stage-1 map)."""
    return masks_of(case["planned_stage1"])


def refiner_logits(planned_stage1: np.ndarray, gate: float) -> np.ndarray:
    """The refiner's output (model/network.py) on the planned grid: per class `prompt + gate * (sam - prompt)`, the
    prompt +-PROMPT_LOGIT on the stage-1 masks, "SAM 2" the same masks moved by SAM_SHIFT voxels."""
    masks = masks_of(planned_stage1).astype(np.float32)
    prompt = (2 * masks - 1) * PROMPT_LOGIT
    sam = np.roll(prompt, SAM_SHIFT, axis=-1)
    classes = prompt + gate * (sam - prompt)
    return np.concatenate([np.full_like(classes[:1], BACKGROUND_LOGIT), classes])


def labels_of(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_at_the_gates_start_the_export_is_stage1s_label_map_where_nnunets_is_not(case, tmp_path):
    """The untrained refiner's logits, exported with the stage-1 file in their properties (nnUNetv2_predict's
    path): stage 1's label map voxel for voxel; nnU-Net's own export of the same logits is not. The saved
    probabilities give the saved segmentation, and the saved properties are nnU-Net's."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits as nnunet_export
    logits = refiner_logits(case["planned_stage1"], GATE_START)
    plans_manager, configuration = case["plans_manager"], case["configuration"]
    properties = with_stage1_prompt(case["properties"], str(case["stage1_file"]), planned_masks(case))
    cascade_export.export_prediction_from_logits(logits, properties, configuration, plans_manager, DATASET_JSON,
                                                 str(tmp_path / "plugin"), save_probabilities=True)
    nnunet_export(logits, dict(case["properties"]), configuration, plans_manager, DATASET_JSON,
                  str(tmp_path / "nnunet"))
    plugin, nnunet = labels_of(tmp_path / f"plugin{FILE_ENDING}"), labels_of(tmp_path / f"nnunet{FILE_ENDING}")
    assert np.array_equal(plugin, case["stage1"]), f"{np.count_nonzero(plugin != case['stage1'])} voxels differ"
    assert np.count_nonzero(nnunet != case["stage1"]) > 0.01 * np.count_nonzero(case["stage1"])
    probabilities = np.load(tmp_path / "plugin.npz")["probabilities"]
    assert np.array_equal(probabilities.argmax(axis=0), plugin)
    saved = pickle.loads((tmp_path / "plugin.pkl").read_bytes())
    assert STAGE1_PROPERTY not in saved and saved.keys() == case["properties"].keys()


def test_with_sam_alone_its_departure_reaches_the_image_grid(case):
    """Gates at 1 (the output is "SAM 2"'s logits), the stage-1 map given as an array (the npy paths): where stage
    1's prompt comes back from nnU-Net's round trip unchanged (away from its boundaries), the export is nnU-Net's
    own, and there it follows "SAM 2", not stage 1. A case without a stage-1 map is exported as nnU-Net does."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
    plans_manager, configuration, label_manager = case["plans_manager"], case["configuration"], case["label_manager"]
    properties, stage1 = case["properties"], case["stage1"]
    logits = refiner_logits(case["planned_stage1"], 1.0)
    plugin = cascade_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration, label_manager,
        with_stage1_prompt(properties, stage1[None], planned_masks(case)))
    nnunet = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration, label_manager, dict(properties))
    # where the prompt's round trip changes no logit (on the cropped, transposed grid; outside the crop both are 0)
    cropped = cascade_export.stage1_on_cropped_grid(stage1[None], properties, plans_manager)
    planned_prompt = cascade_export.prompt_logits(planned_masks(case))
    back = configuration.resampling_fn_probabilities(planned_prompt, cropped.shape[1:], PLANNED_SPACING,
                                                     [properties["spacing"][i] for i in TRANSPOSE_FORWARD])
    survives = np.ones(properties["shape_before_cropping"], dtype=bool)
    survives[bounding_box_to_slice(properties["bbox_used_for_cropping"])] = np.all(
        np.abs(back - cascade_export.prompt_logits(masks_of(cropped))) < 1e-4, axis=0)
    survives = survives.transpose(TRANSPOSE_BACKWARD)
    assert survives.mean() > 0.9
    assert np.array_equal(plugin[survives], nnunet[survives])
    moved = np.count_nonzero((plugin != stage1) & survives)
    assert moved > 0.1 * np.count_nonzero(stage1), f"only {moved} voxels follow SAM 2 away from stage 1"
    plain = cascade_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration, label_manager, dict(properties))
    assert np.array_equal(plain, nnunet)


@pytest.mark.usefixtures("one_torch_thread")
def test_nnunets_in_process_predictions_of_the_untrained_refiner_are_stage1(case, tmp_path):
    """The real refiner at its gates' start in nnU-Net's predictor: `predict_single_npy_array` (the viewer's path)
    and `predict_from_files_sequential` (nnUNetv2_predict -npp 0 -nps 0) give stage 1's label map voxel for voxel.
    (nnUNetv2_predict's parallel path: test_resampled_cascade.py.)"""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_rfmedsam.trainers import nnUNetTrainerRFMedSAM2
    plans_manager, configuration = case["plans_manager"], case["configuration"]
    torch.manual_seed(0)
    network = nnUNetTrainerRFMedSAM2.build_network_architecture(plans_manager, configuration, 3, 3, False)
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()], DATASET_JSON,
                                    "nnUNetTrainerRFMedSAM2", None)
    image, properties = SimpleITKIO().read_images([str(case["image_file"])])
    single = predictor.predict_single_npy_array(image, properties, case["stage1"][None].astype(np.int16))
    assert np.array_equal(single, case["stage1"]), f"{np.count_nonzero(single != case['stage1'])} voxels differ"
    predictor.predict_from_files_sequential([[str(case["image_file"])]], str(tmp_path),
                                            folder_with_segs_from_prev_stage=str(case["folder"] / "stage1"))
    sequential = labels_of(tmp_path / f"{CASE}{FILE_ENDING}")
    assert np.array_equal(sequential, case["stage1"]), f"{np.count_nonzero(sequential != case['stage1'])} differ"
