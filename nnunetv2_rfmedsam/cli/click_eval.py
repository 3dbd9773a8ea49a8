"""`nnUNetv2_rfmedsam_click_eval`: Dice against the number of simulated corrective clicks.

    nnUNetv2_rfmedsam_click_eval -m MODEL_DIR -f FOLD -i IMAGES --gt LABELS --start {box,stage1}
                                 [--prev_stage_predictions DIR] --clicks N -o OUT [-device cpu|cuda]

IMAGES holds `<case>_0000.nii.gz` (one file per channel), LABELS `<case>.nii.gz`. Writes OUT/clicks.json and
OUT/dice_vs_clicks.png (see `nnunetv2_rfmedsam.interactive.click_simulation`). Bad input prints one line,
`error: ...`, to stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

from nnunetv2_rfmedsam.interactive import InteractiveError, InteractiveSession
from nnunetv2_rfmedsam.interactive.click_simulation import START_MODES, ClickEvaluationError, evaluate_clicks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_rfmedsam_click_eval",
        description="Simulate corrective clicks with a trained RFMedSAM 2 refiner (3d_rfmedsam2 model folder) and "
                    "report Dice against the number of clicks, per class and overall.")
    parser.add_argument("-m", required=True, metavar="MODEL_DIR", help="trained 3d_rfmedsam2 model folder")
    parser.add_argument("-f", required=True, metavar="FOLD", help="fold: 0-4 or all")
    parser.add_argument("-i", required=True, metavar="IMAGES", help="folder of <case>_0000.nii.gz images")
    parser.add_argument("--gt", required=True, metavar="LABELS", help="folder of <case>.nii.gz ground truth")
    parser.add_argument("--start", required=True, choices=START_MODES,
                        help="box: the ground truth's box on the slice where each class is largest; "
                             "stage1: the stage-1 prediction as mask prompt")
    parser.add_argument("--prev_stage_predictions", metavar="DIR", default=None,
                        help="stage-1 predictions <case>.nii.gz (required for --start stage1)")
    parser.add_argument("--clicks", required=True, type=int, metavar="N", help="corrective clicks per class")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        session = InteractiveSession.from_model_folder(args.m, args.f, args.chk, args.device)
        summary = evaluate_clicks(session, args.i, args.gt, args.start, args.clicks, args.o,
                                  prev_stage_predictions=args.prev_stage_predictions)
    except (ClickEvaluationError, InteractiveError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    means = ", ".join(f"{n}: {d:.3f}" for n, d in summary["mean_dice_by_clicks"].items() if d is not None)
    print(f"mean Dice by clicks: {means}")
    print(f"wrote clicks.json and dice_vs_clicks.png to {args.o}")


if __name__ == "__main__":
    main()
