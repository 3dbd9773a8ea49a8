"""The cascade's export to the image's grid: stage 2's departure from stage 1 is resampled, stage 1's label map is not.

A refiner that starts at its prompt (`start_at_prompt`, model/network.py) gives, per class, `prompt + gate * (sam -
prompt)` on nnU-Net's planned grid, where `prompt` is +-PROMPT_LOGIT on the stage-1 masks of its input: the
stage-1 label map as nnU-Net's preprocessing cropped, transposed and resampled it (`resampling_fn_seg`). nnU-Net's
export then resamples those logits linearly back to the image's grid (`resampling_fn_probabilities`) and takes the
argmax. Where nnU-Net interpolates (the axial plane of a case whose pixels are not the plan's), a label map
resampled to the plan and its +-10 step resampled back do not give the label map again: 1-7% of the voxels on the
stage-1 boundaries changed, so an untrained cascade, which should return stage 1's segmentation, did not.

So for such a refiner the plugin resamples only the departure from the prompt and adds the prompt of stage 1's own
label map on the image's grid: `prompt_image + resample(logits - prompt_planned)`, which, resampling being linear,
is `prompt_image + resample(gate * (sam - prompt_planned))`. At the gates' start (any departure below PROMPT_LOGIT,
model/network.py) the argmax is stage 1's label map voxel for voxel, on any grid; where stage 1's prompt survives
nnU-Net's round trip (away from its boundaries) the logits are nnU-Net's own, and on its boundaries stage 1's own
step takes the place of its resampled one. Everything else of nnU-Net's export (softmax, argmax, uncropping,
transposing, writing, the probabilities of `save_probabilities`) is unchanged: the rule replaces only the
configuration's resampling of logits. `prompt_planned` is taken from the network's input, not recomputed:
nnU-Net's preprocessing resamples the stage-1 map with its background outside the image's nonzero mask labelled
-1, and batchgenerators' argmax resampling of labels (0.25.5) lets that label change where the foreground wins
beside it.

How the stage-1 map reaches the export: nnU-Net's predictor exports in the process that predicts
(`predict_single_npy_array`, `predict_from_files_sequential`) or in a spawned pool (`predict_from_data_iterator`,
behind nnUNetv2_predict), always through the module-global `export_prediction_from_logits` or
`convert_predicted_logits_to_segmentation_with_correct_shape` of nnunetv2.inference.predict_from_raw_data, with
the case's properties. The plugin replaces those two names with this module's functions (pickled by name, so the
pool's workers import this module) and puts a `Stage1Prompt` into each case's properties (STAGE1_PROPERTY) where
the predictor has both parts: beside its data iterators (which yield the cases in the order of their lists, with
the network's input), and in the preprocessor of its in-process paths. Only the predictor of a refiner that starts
at its prompt does; every other network and the plain refiner keep nnU-Net's export as it is. Installed with the
first RFMedSAM2Network, as whole_volume_prediction.py.

Not covered: a refiner's final validation in training (nnUNetTrainer.perform_actual_validation), whose stage-1
input is stage 1's prediction already resampled to the planned grid (`predicted_next_stage`): there is no stage-1
map on the image's grid to start from. Its Dice is informative only.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference import export_prediction as nnunet_export

# the key of a case's properties that holds its Stage1Prompt
STAGE1_PROPERTY = "rfmedsam2_stage1_prompt"
_STOCK = "_rfmedsam2_stock_"


@dataclass(frozen=True)
class Stage1Prompt:
    """A case's stage-1 label map twice: `labels` on the image's grid (its file, or the array (1, *image) in the
    axis order of the plans' reader), and `planned` the masks (K, *planned grid) of the network's input, one per
    foreground label."""

    labels: str | np.ndarray
    planned: np.ndarray


def convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, label_manager, properties_dict: dict,
        return_probabilities: bool = False, num_threads_torch: int = default_num_processes):
    """nnU-Net's function of this name; for a case with a Stage1Prompt, its logits' departure from stage 1's prompt
    is what is resampled (see the module's text)."""
    configuration_manager, properties_dict = _with_rule(configuration_manager, plans_manager, label_manager,
                                                        properties_dict)
    return nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, label_manager, properties_dict,
        return_probabilities, num_threads_torch)


def export_prediction_from_logits(predicted_array_or_file, properties_dict: dict, configuration_manager,
                                  plans_manager, dataset_json_dict_or_file, output_file_truncated: str,
                                  save_probabilities: bool = False, num_threads_torch: int = default_num_processes):
    """nnU-Net's function of this name (the segmentation file, and with `save_probabilities` the probabilities and
    the properties); for a case with a Stage1Prompt, the rule of the module's text."""
    if isinstance(dataset_json_dict_or_file, str):
        from batchgenerators.utilities.file_and_folder_operations import load_json
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    label_manager = plans_manager.get_label_manager(dataset_json_dict_or_file)
    configuration_manager, properties_dict = _with_rule(configuration_manager, plans_manager, label_manager,
                                                        properties_dict)
    nnunet_export.export_prediction_from_logits(predicted_array_or_file, properties_dict, configuration_manager,
                                                plans_manager, dataset_json_dict_or_file, output_file_truncated,
                                                save_probabilities, num_threads_torch)


def prompt_logits(masks: np.ndarray) -> np.ndarray:
    """Stage-1 masks (K, *grid) -> the refiner's prompt logits (K + 1, *grid): the constant background logit, then
    +-PROMPT_LOGIT inside and outside each mask (model/network.py)."""
    from nnunetv2_rfmedsam.model.network import BACKGROUND_LOGIT, PROMPT_LOGIT
    background = np.full((1, *masks.shape[1:]), BACKGROUND_LOGIT, dtype=np.float32)
    return np.concatenate([background, np.where(masks, PROMPT_LOGIT, -PROMPT_LOGIT).astype(np.float32)])


class StartingAtStage1:
    """A configuration manager that is nnU-Net's, except that its resampling of logits to the image's grid resamples
    their departure from the planned stage-1 prompt and adds the prompt of stage 1's masks on the image's grid."""

    def __init__(self, configuration_manager, planned_masks: np.ndarray, image_masks: np.ndarray):
        # image_masks: on the grid nnU-Net's export resamples to (the image's, cropped and transposed)
        self._configuration_manager = configuration_manager
        self._planned_masks, self._image_masks = planned_masks, image_masks

    def __getattr__(self, name):
        return getattr(self._configuration_manager, name)

    def resampling_fn_probabilities(self, logits, new_shape, current_spacing, new_spacing):
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape[1:] != self._planned_masks.shape[1:]:
            raise ValueError(f"stage-1 prompt: masks of shape {self._planned_masks.shape[1:]} for logits of shape "
                             f"{logits.shape[1:]}")
        departure = logits - prompt_logits(self._planned_masks)
        resampled = self._configuration_manager.resampling_fn_probabilities(departure, new_shape, current_spacing,
                                                                            new_spacing)
        return resampled + prompt_logits(self._image_masks)


def stage1_on_cropped_grid(labels, properties: dict, plans_manager) -> np.ndarray:
    """A case's stage-1 label map (its file, or the array (1, *image) its reader gives) -> (1, *grid) transposed and
    cropped as nnU-Net's preprocessing does before resampling (where its export resamples the logits to)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
    if isinstance(labels, str):
        labels = plans_manager.image_reader_writer_class().read_seg(labels)[0]
    labels = np.asarray(labels).transpose([0, *[axis + 1 for axis in plans_manager.transpose_forward]])
    return labels[(slice(None), *bounding_box_to_slice(properties["bbox_used_for_cropping"]))]


def _with_rule(configuration_manager, plans_manager, label_manager, properties: dict):
    """(configuration manager, properties) for nnU-Net's export: unchanged for a case without a Stage1Prompt; else
    the StartingAtStage1 manager and the properties without it (nnU-Net saves them with the probabilities)."""
    prompt = properties.get(STAGE1_PROPERTY)
    if prompt is None:
        return configuration_manager, properties
    properties = {key: value for key, value in properties.items() if key != STAGE1_PROPERTY}
    labels = stage1_on_cropped_grid(prompt.labels, properties, plans_manager)
    image_masks = np.stack([labels[0] == label for label in label_manager.foreground_labels])
    return StartingAtStage1(configuration_manager, prompt.planned, image_masks), properties


def starts_at_prompt(network) -> bool:
    """Whether `network` (unwrapped as whole_volume_prediction.find_refiner does) is a refiner that starts at its
    prompt."""
    from nnunetv2_rfmedsam.whole_volume_prediction import find_refiner
    return getattr(find_refiner(network), "prompt_gate_logits", None) is not None


def with_stage1_prompt(properties: dict, labels, planned_masks: np.ndarray) -> dict:
    """A copy of a case's properties that carries its Stage1Prompt to the export."""
    return {**properties, STAGE1_PROPERTY: Stage1Prompt(labels, planned_masks)}


def install() -> None:
    """Route nnU-Net's predictor's exports through this module's functions and hand them each case's
    Stage1Prompt, for refiners that start at their prompt (see the module's text)."""
    from nnunetv2.inference import predict_from_raw_data
    predictor = predict_from_raw_data.nnUNetPredictor
    if hasattr(predictor, _STOCK + "predict_single_npy_array"):
        return
    predict_from_raw_data.export_prediction_from_logits = export_prediction_from_logits
    predict_from_raw_data.convert_predicted_logits_to_segmentation_with_correct_shape = \
        convert_predicted_logits_to_segmentation_with_correct_shape
    for name, wrapper in _WRAPPERS.items():
        stock = getattr(predictor, name)
        setattr(predictor, _STOCK + name, stock)
        # nnU-Net reads its methods' signatures (predict_from_files_sequential saves its arguments by them)
        setattr(predictor, name, functools.update_wrapper(wrapper, stock, assigned=(), updated=()))


def _stock(predictor, name: str):
    return getattr(predictor, _STOCK + name)


def _data_iterator_from_files(self, input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated,
                              num_processes):
    items = _stock(self, "_internal_get_data_iterator_from_lists_of_filenames")(
        input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
    if seg_from_prev_stage_files is None or not starts_at_prompt(self.network):
        return items
    return _carrying_stage1(items, seg_from_prev_stage_files, len(self.label_manager.foreground_labels))


def _data_iterator_from_npy(self, images, segs_from_prev_stage, *args, **kwargs):
    items = _stock(self, "get_data_iterator_from_raw_npy_data")(images, segs_from_prev_stage, *args, **kwargs)
    if segs_from_prev_stage is None or not starts_at_prompt(self.network):
        return items
    segs = [segs_from_prev_stage] if isinstance(segs_from_prev_stage, np.ndarray) else segs_from_prev_stage
    return _carrying_stage1(items, segs, len(self.label_manager.foreground_labels))


def _carrying_stage1(items, stage1_labels, count: int):
    """nnU-Net's data iterator, each case's properties with its Stage1Prompt: its stage-1 map from `stage1_labels`
    (nnU-Net's iterators keep the order of their lists, as its predict_from_data_iterator returns results in it),
    the planned masks from the last `count` channels of the network's input (image channels, then one-hot)."""
    for item, labels in zip(items, stage1_labels, strict=True):
        if labels is not None:
            planned = (torch.as_tensor(item["data"])[-count:] > 0.5).cpu().numpy()
            item = {**item, "data_properties": with_stage1_prompt(item["data_properties"], labels, planned)}
        yield item


def _recording_in_process(name: str):
    """A wrapper of the predictor's method `name`, whose cases nnU-Net preprocesses in this process with
    `configuration_manager.preprocessor_class`: for a refiner that starts at its prompt, with _RecordingStage1."""
    def wrapper(self, *args, **kwargs):
        if not starts_at_prompt(self.network):
            return _stock(self, name)(*args, **kwargs)
        with _recording_stage1(self):
            return _stock(self, name)(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _recording_stage1(predictor):
    configuration_manager = predictor.configuration_manager
    predictor.configuration_manager = _RecordingStage1(configuration_manager)
    try:
        yield
    finally:
        predictor.configuration_manager = configuration_manager


class _RecordingStage1:
    """The predictor's configuration manager, except that its preprocessor puts each case's Stage1Prompt into the
    case's properties: the stage-1 map it is given and the masks of what it makes of it."""

    def __init__(self, configuration_manager):
        self._configuration_manager = configuration_manager

    def __getattr__(self, name):
        return getattr(self._configuration_manager, name)

    @property
    def preprocessor_class(self):
        class RecordingStage1(self._configuration_manager.preprocessor_class):
            def run_case_npy(self, data, seg, properties, plans_manager, configuration_manager, dataset_json):
                data, planned, properties = super().run_case_npy(data, seg, properties, plans_manager,
                                                                 configuration_manager, dataset_json)
                if seg is not None:
                    labels = plans_manager.get_label_manager(dataset_json).foreground_labels
                    masks = np.stack([planned[0] == label for label in labels])
                    properties = with_stage1_prompt(properties, seg, masks)
                return data, planned, properties
        return RecordingStage1


_WRAPPERS = {
    "_internal_get_data_iterator_from_lists_of_filenames": _data_iterator_from_files,
    "get_data_iterator_from_raw_npy_data": _data_iterator_from_npy,
    "predict_single_npy_array": _recording_in_process("predict_single_npy_array"),
    "predict_from_files_sequential": _recording_in_process("predict_from_files_sequential"),
}
