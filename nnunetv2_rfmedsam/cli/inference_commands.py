"""`nnUNetv2_rfmedsam_inference_commands`: the commands that predict with the trained stage 1 and cascade.

    nnUNetv2_rfmedsam_inference_commands -d 4 [-p PLANS] [-i IMAGES] [-o OUT]

`nnUNetv2_find_best_configuration` cannot say this for a custom cascade: it prints the second stage without the
stage-1 prediction before it and without `-prev_stage_predictions`. This command reads which folds of each stage
have finished training (`checkpoint_final.pth`) under `$nnUNet_results` and prints stage 1's prediction with the
ensemble of its folds, then the cascade from stage 1's output with the ensemble of stage 2's folds (nnU-Net
averages the folds given to `-f`). A stage without a finished fold is one line naming its folder, exit code 2.
Before the cascade, a comment names the SAM 2.1 file stage 2's checkpoints read their frozen weights from
(model/sam2_reference.py), which a machine that did not train them needs as well.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from nnunetv2_rfmedsam.settings import (PLANS_IDENTIFIER, SAM2_CHECKPOINT_VARIABLE, STAGE1_CONFIGURATION,
                                        STAGE1_TRAINER, STAGE2_CONFIGURATION, STAGE2_TRAINER)

FIVE_FOLDS = ["0", "1", "2", "3", "4"]


class NoTrainedFolds(FileNotFoundError):
    pass


class UnreadableCheckpoint(ValueError):
    pass


def trained_folds(model_folder: Path) -> list[str]:
    """Folds with a finished training; the five cross-validation folds when all five are, as nnU-Net ensembles
    them, else `all` when it is, else the finished numbered folds."""
    finished = sorted(p.parent.name.removeprefix("fold_") for p in model_folder.glob("fold_*/checkpoint_final.pth"))
    if all(f in finished for f in FIVE_FOLDS):
        return FIVE_FOLDS
    if "all" in finished:
        return ["all"]
    numbered = sorted((f for f in finished if f.isdigit()), key=int)
    if not numbered:
        raise NoTrainedFolds(f"{model_folder}: no fold has finished training (no fold_*/checkpoint_final.pth)")
    return numbered


def sam2_files_read(model_folder: Path, folds: list[str]) -> list[str]:
    """Shell comments naming the SAM 2 files the folds' checkpoints reference (none for checkpoints that hold
    all of SAM 2's weights)."""
    import torch
    from nnunetv2_rfmedsam.model.sam2_reference import REFERENCE_KEY, SAM2Reference
    references = []
    for fold in folds:
        path = model_folder / f"fold_{fold}" / "checkpoint_final.pth"
        try:  # mmap: only the reference is read, not the rest of the file
            weights = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["network_weights"]
        except Exception as error:  # torch.load raises many types for unreadable files; all mean the same here
            raise UnreadableCheckpoint(f"{path}: not a readable nnU-Net checkpoint ({type(error).__name__})") from error
        if REFERENCE_KEY in weights and (reference := SAM2Reference.from_tensor(weights[REFERENCE_KEY])) \
                not in references:
            references.append(reference)
    return [f"# stage 2 reads SAM 2's frozen weights from {reference.describe()}; on another machine: export "
            f"{SAM2_CHECKPOINT_VARIABLE}=/path/to/{reference.name} (the same file)" for reference in references]


def inference_commands(results: Path, dataset_name: str, dataset_id: int, plans: str, images: str,
                       output: str) -> list[str]:
    """The lines to print: stage 1's command, comments on the SAM 2 file stage 2 needs, the cascade's command."""
    stage1 = results / dataset_name / f"{STAGE1_TRAINER}__{plans}__{STAGE1_CONFIGURATION}"
    stage2 = results / dataset_name / f"{STAGE2_TRAINER}__{plans}__{STAGE2_CONFIGURATION}"
    stage1_out, cascade_out = f"{output}/stage1", f"{output}/cascade"
    common = ["-d", str(dataset_id), "-p", plans]
    stage1_folds, stage2_folds = trained_folds(stage1), trained_folds(stage2)
    return [
        shlex.join(["nnUNetv2_predict", "-i", images, "-o", stage1_out, *common, "-c", STAGE1_CONFIGURATION,
                    "-tr", STAGE1_TRAINER, "-f", *stage1_folds]),
        *sam2_files_read(stage2, stage2_folds),
        shlex.join(["nnUNetv2_predict", "-i", images, "-o", cascade_out, *common, "-c", STAGE2_CONFIGURATION,
                    "-tr", STAGE2_TRAINER, "-f", *stage2_folds, "-prev_stage_predictions", stage1_out]),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_rfmedsam_inference_commands",
        description="Print the nnUNetv2_predict commands of the trained RFMedSAM 2 cascade: stage 1 with the "
                    "ensemble of its trained folds, then stage 2 on stage 1's output (what "
                    "nnUNetv2_find_best_configuration cannot print for this cascade).")
    parser.add_argument("-d", type=int, required=True, help="dataset ID")
    parser.add_argument("-p", default=PLANS_IDENTIFIER, help=f"plans identifier (default {PLANS_IDENTIFIER})")
    parser.add_argument("-i", default="INPUT_FOLDER", help="images to predict (default: a placeholder)")
    parser.add_argument("-o", default="OUTPUT_FOLDER", help="output folder; stage1/ and cascade/ go below it")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_results:
        parser.exit(2, f"{parser.prog}: error: nnUNet_results is not set\n")
    try:
        commands = inference_commands(Path(os.fspath(nnUNet_results)), maybe_convert_to_dataset_name(args.d), args.d,
                                      args.p, args.i, args.o)
    except (NoTrainedFolds, UnreadableCheckpoint) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for line in commands:
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
