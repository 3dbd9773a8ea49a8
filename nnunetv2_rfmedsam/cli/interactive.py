"""`nnUNetv2_rfmedsam_interactive`: segment an image from prompts given in a JSON file, with a trained refiner.

    nnUNetv2_rfmedsam_interactive -m MODEL_DIR -f FOLD -i IMAGE --prompts PROMPTS.json -o OUT.nii.gz [-device cpu]

PROMPTS.json:
    {"prompts": [{"class": 1, "slice": 12, "box": [y0, x0, y1, x1], "points": [[y, x, 1], [y, x, 0]]}, ...]}
Each prompt needs a box, points or both. Coordinates are voxel indices in SimpleITK's GetArrayFromImage order:
"slice" indexes the first axis, then y and x; a point's third value is 1 (positive) or 0 (negative). Prompts
are applied in order (prompt 1 is the first), then propagated through the volume (see
`nnunetv2_rfmedsam.interactive.session`). The output has the input's geometry. Bad input prints one line,
`error: ...`, to stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nnunetv2_rfmedsam.interactive import InteractiveError, InteractiveSession


class PromptsFileError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_rfmedsam_interactive",
        description="Segment an image from boxes and clicks (a JSON file) with a trained RFMedSAM 2 refiner "
                    "(3d_rfmedsam2 model folder), propagating them through the volume with SAM 2's memory.")
    parser.add_argument("-m", required=True, metavar="MODEL_DIR",
                        help="trained model folder, e.g. $nnUNet_results/DatasetXXX/"
                             "nnUNetTrainerRFMedSAM2__nnUNetRFMedSAM2Plans__3d_rfmedsam2")
    parser.add_argument("-f", required=True, metavar="FOLD", help="fold: 0-4 or all")
    parser.add_argument("-i", required=True, metavar="IMAGE", nargs="+",
                        help="the image (NIfTI), or one file per channel for multi-channel models")
    parser.add_argument("--prompts", required=True, metavar="PROMPTS.json", help="the prompts (see above)")
    parser.add_argument("-o", required=True, metavar="OUT.nii.gz", help="output segmentation")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    return parser


def read_prompts(path: Path) -> list[dict]:
    """The prompts of a prompts file, checked for their form (values are checked by the session)."""
    if not path.is_file():
        raise PromptsFileError(f"prompts file {path}: no such file")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PromptsFileError(f"prompts file {path}: not valid JSON ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("prompts"), list) or not content["prompts"]:
        raise PromptsFileError(f"prompts file {path}: expected {{\"prompts\": [...]}} with at least one prompt")
    for number, prompt in enumerate(content["prompts"], start=1):
        where = f"prompts file {path}: prompt {number}"
        if not isinstance(prompt, dict):
            raise PromptsFileError(f"{where}: expected an object with \"class\", \"slice\", \"box\" and/or \"points\"")
        unknown = set(prompt) - {"class", "slice", "box", "points"}
        if unknown:
            raise PromptsFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("class", "slice"):
            if not isinstance(prompt.get(key), int) or isinstance(prompt.get(key), bool):
                raise PromptsFileError(f"{where}: \"{key}\" must be an integer")
        if "box" not in prompt and "points" not in prompt:
            raise PromptsFileError(f"{where}: give a \"box\", \"points\" or both")
        if "box" in prompt and not _numbers(prompt["box"], 4):
            raise PromptsFileError(f"{where}: \"box\" must be [y0, x0, y1, x1]")
        if "points" in prompt and (not isinstance(prompt["points"], list) or not prompt["points"]
                                   or not all(_numbers(p, 3) for p in prompt["points"])):
            raise PromptsFileError(f"{where}: \"points\" must be a list of [y, x, label]")
    return content["prompts"]


def _numbers(value, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        prompts = read_prompts(Path(args.prompts))
        session = InteractiveSession.from_model_folder(args.m, args.f, args.chk, args.device)
        session.set_image(args.i if len(args.i) > 1 else args.i[0])
        for prompt in prompts:
            session.add_prompt(prompt["class"], prompt["slice"], box=prompt.get("box"), points=prompt.get("points"))
        session.propagate()
        session.save(args.o)
    except (PromptsFileError, InteractiveError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.o}")


if __name__ == "__main__":
    main()
