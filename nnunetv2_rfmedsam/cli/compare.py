"""`nnUNetv2_rfmedsam_compare`: compare folders of segmentation predictions against ground truth.

    nnUNetv2_rfmedsam_compare --gt DIR --pred NAME=DIR [--pred NAME=DIR ...] -o OUT
                              [--labels dataset.json] [--images DIR] [--tolerance-mm X] [-np N] [--strict]

The first --pred is the baseline. Writes OUT/metrics.json, report.md, cases.csv, dice_per_class.png,
paired_cases.png and contours_<case>.png of the cases to look at, on the images of --images when given (see
`nnunetv2_rfmedsam.evaluation.compare` for the conventions). Bad input prints one line,
`error: ...`, to stderr and exits with code 2; missing cases are a warning unless --strict.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from nnunetv2_rfmedsam.evaluation.compare import CompareError, compare_folders
from nnunetv2_rfmedsam.evaluation.metrics import DEFAULT_TOLERANCE_MM


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_rfmedsam_compare",
        description="Dice, normalised surface Dice and HD95 of prediction folders against ground truth, with "
                    "paired statistics of each method against the first (the baseline).")
    parser.add_argument("--gt", required=True, metavar="DIR", help="ground-truth folder (<case>.nii.gz)")
    parser.add_argument("--pred", required=True, action="append", metavar="NAME=DIR",
                        help="a method's prediction folder; repeat for more methods, the first is the baseline")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--labels", metavar="dataset.json", default=None,
                        help="nnU-Net dataset.json whose labels (except background) are evaluated; "
                             "default: the nonzero labels found in the ground truth")
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="the cases' images (nnU-Net's <case>_0000.nii.gz, e.g. imagesTs) under the contour "
                             "figures; without it the figures show the contours alone")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                        help=f"normalised surface Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM:g})")
    parser.add_argument("-np", type=int, default=1, help="worker processes (default 1: in this process)")
    parser.add_argument("--strict", action="store_true", help="refuse missing cases instead of warning")
    return parser


def parse_predictions(values: list[str]) -> dict[str, str]:
    """NAME=DIR arguments -> {name: folder}, in the order given."""
    predictions: dict[str, str] = {}
    for value in values:
        name, separator, folder = value.partition("=")
        if not separator or not name or not folder:
            raise CompareError(f"--pred {value!r}: expected NAME=DIR, e.g. --pred baseline=/path/to/predictions")
        if name in predictions:
            raise CompareError(f"--pred: method name {name!r} is given twice")
        predictions[name] = folder
    return predictions


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # one readable line per warning (missing cases) instead of Python's file:line form
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        compare_folders(args.gt, parse_predictions(args.pred), args.output, labels_json=args.labels,
                        tolerance_mm=args.tolerance_mm, num_processes=args.np, strict=args.strict,
                        images_dir=args.images)
    except CompareError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote metrics.json, report.md, cases.csv, dice_per_class.png, paired_cases.png and the contour figures "
          f"of the cases to look at (contours_<case>.png, linked from report.md) to {args.output}")


if __name__ == "__main__":
    main()
