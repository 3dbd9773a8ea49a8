"""`nnUNetv2_rfmedsam_plan_and_preprocess`: stock `nnUNetv2_plan_and_preprocess` with the RFMedSAM 2 planner.

Stock `-pl` only finds planners inside nnunetv2, so this command takes every stock flag, plans with
`nnUNetPlannerRFMedSAM2` by default (or with `-pl <stock planner>` plus the `3d_rfmedsam2` stage), and
adds the SAM 2 options. It calls nnU-Net's own fingerprint, planning and preprocessing functions.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

from nnunetv2_rfmedsam.settings import (PLANS_IDENTIFIER, SAM2_MODELS, STAGE2_CONFIGURATION, SAM2Settings,
                                        SettingsError)

DEFAULT_PLANNER = "nnUNetPlannerRFMedSAM2"
# the names nnU-Net's own default -np uses; anything else gets 4, as in nnU-Net
STOCK_DEFAULT_NP = {"2d": 8, "3d_fullres": 4, "3d_lowres": 8}
SAM2_OPTIONS = {  # command-line option -> SAM2Settings field
    "--sam2-model": "model_size",
    "--sam2-image-size": "image_size",
    "--sam2-adapter-width": "adapter_width",
    "--sam2-passes": "refinement_passes",
    "--sam2-slices-per-patch": "slices_per_patch",
    "--sam2-objects-per-step": "objects_per_step",
}

# The figures are those of model/hiera_windows.py (tested there), read off sam2's configs and hieradet.py. Hiera
# attends in windows of 8, 4, 14 and 7 tokens on its S/4, S/8, S/16 and S/32 grids (tiny, small, base_plus;
# large: 8, 4, 16, 8) and pads each grid with zeros to whole windows, masking nothing. With the encoder frozen,
# padding it was not trained with changes its features.
IMAGE_SIZE_HELP = (
    "SAM 2 input size in pixels, a multiple of 32 (default {default}). 1024 is what SAM 2 was trained at: the "
    "default, for GPU use. Multiples of 224 (224, 448, 896) leave no attention window of Hiera padded at any "
    "stage for the tiny, small and base_plus models and are the cheaper choices, 224 for CPU demos (the large "
    "model's windows need multiples of 256 instead). Other multiples of 32 work but pad the windows at the "
    "grid's edges with zeros, and the frozen encoder never saw mostly padded windows beyond those of 1024: "
    "tiny's edge windows at stages 3 and 4 are 43%% zeros at 1024 (and at 128), 71%% at 512, 86%% at 256. "
    "Planning warns when a size pads a stage's edge windows by more than a third and more than at 1024.")


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2_rfmedsam.planners.rfmedsam2_planner import STAGE2_BATCH_SIZE, STAGE2_GPU_MEMORY_TARGET_GB
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_rfmedsam_plan_and_preprocess",
        description="nnUNetv2_plan_and_preprocess with the RFMedSAM 2 planner: nnU-Net's default configurations "
                    f"plus '{STAGE2_CONFIGURATION}' (plans identifier {PLANS_IDENTIFIER}).")
    # the stock flags, with the stock meanings
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset IDs, e.g. 4 or 2 4 5")
    parser.add_argument("-fpe", default="DatasetFingerprintExtractor", help="fingerprint extractor class")
    parser.add_argument("-npfp", type=int, default=8, help="processes for fingerprint extraction (default 8)")
    parser.add_argument("--verify_dataset_integrity", action="store_true", help="check the dataset first")
    parser.add_argument("--no_pp", action="store_true", help="fingerprint and plan only, no preprocessing")
    parser.add_argument("--clean", action="store_true", help="overwrite existing fingerprints")
    parser.add_argument("-pl", default=DEFAULT_PLANNER,
                        help=f"planner: {DEFAULT_PLANNER} (default) or any nnU-Net planner name, which then plans "
                             f"stage 1 and gains the {STAGE2_CONFIGURATION} stage")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help=f"GPU memory target in GB: nnU-Net's configurations plan for it as in nnU-Net, and "
                             f"{STAGE2_CONFIGURATION} lowers its objects per step, batch size and slices per patch "
                             f"(in that order) to fit it, leaving alone those given below (default: the planner's "
                             f"own for nnU-Net's configurations, {STAGE2_GPU_MEMORY_TARGET_GB:g} for "
                             f"{STAGE2_CONFIGURATION})")
    parser.add_argument("-preprocessor_name", default="DefaultPreprocessor", help="preprocessor class")
    parser.add_argument("-overwrite_target_spacing", nargs="+", default=None, help="3d_fullres target spacing")
    parser.add_argument("-overwrite_plans_name", default=None,
                        help=f"plans identifier (default {PLANS_IDENTIFIER} for {DEFAULT_PLANNER}; for another "
                             f"planner its own default with RFMedSAM2 before 'Plans', e.g. nnUNetResEncUNetMRFMedSAM2Plans "
                             f"for nnUNetPlannerResEncM, so that no planner overwrites another's plans)")
    parser.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"],
                        help="configurations to preprocess (default: 2d 3d_fullres 3d_lowres). "
                             f"{STAGE2_CONFIGURATION} reuses 3d_fullres's data")
    parser.add_argument("-np", type=int, nargs="+", default=None,
                        help="processes for preprocessing, one number or one per configuration")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--no_pbar", action="store_true")
    # SAM 2 settings of 3d_rfmedsam2
    defaults = SAM2Settings()
    parser.add_argument("--sam2-model", default=defaults.model_size,
                        help=f"SAM 2 model size: {', '.join(SAM2_MODELS)} (default {defaults.model_size})")
    parser.add_argument("--sam2-image-size", type=_integer, default=defaults.image_size,
                        help=IMAGE_SIZE_HELP.format(default=defaults.image_size))
    parser.add_argument("--sam2-adapter-width", type=_integer, default=defaults.adapter_width,
                        help=f"hidden width of the adapters (default {defaults.adapter_width})")
    parser.add_argument("--sam2-passes", type=_integer, default=defaults.refinement_passes,
                        help=f"refinement passes, 1 or 2 (default {defaults.refinement_passes})")
    parser.add_argument("--sam2-slices-per-patch", type=_integer, default=None,
                        help=f"slices per training patch (default: at most {defaults.slices_per_patch}, as many as "
                             f"fit -gpu_memory_target)")
    parser.add_argument("--sam2-objects-per-step", type=_integer, default=None,
                        help="classes SAM 2 tracks per training step, drawn at random each step (default: as many "
                             "as fit -gpu_memory_target, at most every class)")
    parser.add_argument("--sam2-batch-size", type=_integer, default=None,
                        help=f"patches per training step of {STAGE2_CONFIGURATION} (default: at most "
                             f"{STAGE2_BATCH_SIZE}, as many as fit -gpu_memory_target)")
    parser.add_argument("--sam2-no-memory", action="store_true",
                        help="turn SAM 2's memory across slices off (an ablation)")
    parser.add_argument("--sam2-plain-refiner", action="store_true",
                        help="the paper's plain refiner, SAM 2's logits alone (an ablation); by default the refinement "
                             "starts at the stage-1 mask through a learned per-class gate, so an untrained refiner "
                             "reproduces stage 1 exactly")
    parser.add_argument("--sam2-no-presence-loss", action="store_true",
                        help="leave SAM 2's object-score head frozen, without the presence loss (an ablation)")
    parser.add_argument("--sam2-no-click-training", action="store_true",
                        help="train the second refinement pass without clicks sampled from the first pass's errors "
                             "(an ablation; the refiner then learns box and mask prompts only)")
    parser.add_argument("--sam2-test-time-mirroring", action="store_true",
                        help="stage 2 also averages over a flip of the last in-plane axis at test time, as nnU-Net "
                             "mirrors (doubles stage 2's prediction time; off by default: its prompts already are "
                             "stage 1's mirror ensemble)")
    return parser


def _integer(text: str):
    # keep the raw text when it is not an integer: the settings check then names the option and allowed values
    try:
        return int(text)
    except ValueError:
        return text


def sam2_settings_from_args(args: argparse.Namespace) -> SAM2Settings:
    values = {field: getattr(args, option[2:].replace("-", "_")) for option, field in SAM2_OPTIONS.items()}
    values = {field: value for field, value in values.items() if value is not None}  # not given: the default
    values["use_memory"] = not args.sam2_no_memory
    values["train_with_clicks"] = not args.sam2_no_click_training
    values["start_at_prompt"] = not args.sam2_plain_refiner
    values["test_time_mirroring"] = args.sam2_test_time_mirroring
    if args.sam2_no_presence_loss:
        values["presence_loss_weight"] = 0.0
    try:
        return SAM2Settings(**values)
    except SettingsError as error:
        field, _, problem = str(error).partition(": ")
        option = next(o for o, f in SAM2_OPTIONS.items() if f == field)
        raise SettingsError(f"{option}: {problem}") from None


def stage2_choices_from_args(args: argparse.Namespace) -> dict:
    """The planner's keyword arguments for what the user fixed of stage 2's training step (the rest it fits to
    the GPU memory target)."""
    if args.sam2_batch_size is not None and (not isinstance(args.sam2_batch_size, int) or args.sam2_batch_size < 1):
        raise SettingsError(f"--sam2-batch-size: {args.sam2_batch_size!r} is not allowed; use a positive integer")
    given = {"batch_size": args.sam2_batch_size, "slices_per_patch": args.sam2_slices_per_patch,
             "objects_per_step": args.sam2_objects_per_step}
    choices = {"stage2_fixed": tuple(name for name, value in given.items() if value is not None)}
    if args.sam2_batch_size is not None:
        choices["stage2_batch_size"] = args.sam2_batch_size
    return choices


def resolve_planner_class(name: str):
    from nnunetv2_rfmedsam.planners import RFMedSAM2PlansMixin, nnUNetPlannerRFMedSAM2
    if name == DEFAULT_PLANNER:
        return nnUNetPlannerRFMedSAM2
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    stock = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                        current_module="nnunetv2.experiment_planning")
    if stock is None:
        raise SettingsError(f"-pl: {name!r} is neither {DEFAULT_PLANNER} nor a planner in nnunetv2.experiment_planning")
    return type(f"{name}RFMedSAM2", (RFMedSAM2PlansMixin, stock), {"stock_planner": stock})


def default_plans_name(planner_class) -> str:
    """The plans identifier a planner writes when -overwrite_plans_name is not given: ours for the default
    planner, else the stock planner's own default with `RFMedSAM2` inserted before `Plans`."""
    import inspect
    from nnunetv2_rfmedsam.planners import nnUNetPlannerRFMedSAM2
    if planner_class is nnUNetPlannerRFMedSAM2:
        return PLANS_IDENTIFIER
    stock = inspect.signature(planner_class.stock_planner.__init__).parameters["plans_name"].default
    return stock[:-len("Plans")] + "RFMedSAM2Plans" if stock.endswith("Plans") else stock + "_RFMedSAM2"


def check_raw_datasets(dataset_ids: list[int]) -> None:
    """Refuse unsupported datasets (dataset_support.py) before any fingerprint or plan is written."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2_rfmedsam.dataset_support import check_raw_dataset_supported
    for dataset_id in dataset_ids:
        check_raw_dataset_supported(os.path.join(nnUNet_raw, convert_id_to_dataset_name(dataset_id), "dataset.json"))


def configurations_to_preprocess(dataset_id: int, plans_identifier: str, configurations: list[str],
                                 num_processes: list[int]) -> tuple[list[str], list[int]]:
    """Drop configurations whose data another requested configuration already preprocesses."""
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.paths import nnUNet_preprocessed
    plans = PlansManager(os.path.join(nnUNet_preprocessed, convert_id_to_dataset_name(dataset_id),
                                      plans_identifier + ".json"))
    kept, kept_np, identifiers = [], [], set()
    for configuration, n in zip(configurations, num_processes):
        if configuration in plans.available_configurations:
            identifier = plans.get_configuration(configuration).data_identifier
            if identifier in identifiers:
                print(f"{configuration}: uses the data of an already listed configuration ({identifier}); "
                      f"not preprocessed twice")
                continue
            identifiers.add(identifier)
        kept.append(configuration)
        kept_np.append(n)
    return kept, kept_np


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nnunetv2_rfmedsam.dataset_support import UnsupportedDataset
    try:
        settings = sam2_settings_from_args(args)
        stage2_choices = stage2_choices_from_args(args)
        planner_class = resolve_planner_class(args.pl)
        check_raw_datasets(args.d)
    except (SettingsError, UnsupportedDataset) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.np is None:
        num_processes = [STOCK_DEFAULT_NP.get(c, 4) for c in args.c]
    elif len(args.np) in (1, len(args.c)):
        num_processes = args.np * len(args.c) if len(args.np) == 1 else args.np
    else:
        parser.error(f"-np: give one number or one per configuration ({len(args.c)}), not {len(args.np)}")

    from nnunetv2_rfmedsam.model.hiera_windows import padding_warning
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                      plan_experiment_dataset, preprocess)
    warning = padding_warning(settings.model_size, settings.image_size)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print("Fingerprint extraction...")
    extract_fingerprints(args.d, args.fpe, args.npfp, args.verify_dataset_integrity, args.clean, args.verbose,
                         show_progress_bar=not args.no_pbar)
    print(f"Experiment planning with {planner_class.__name__} ({settings})...")
    plans_name = args.overwrite_plans_name or default_plans_name(planner_class)
    planner = functools.partial(planner_class, sam2_settings=settings, **stage2_choices)
    for dataset_id in args.d:
        plan_experiment_dataset(dataset_id, planner, args.gpu_memory_target, args.preprocessor_name,
                                args.overwrite_target_spacing, plans_name)
    if args.no_pp:
        return
    print("Preprocessing...")
    for dataset_id in args.d:
        configurations, dataset_np = configurations_to_preprocess(dataset_id, plans_name, args.c, num_processes)
        preprocess([dataset_id], plans_name, configurations, dataset_np, args.verbose,
                   show_progress_bar=not args.no_pbar)


if __name__ == "__main__":
    main()
