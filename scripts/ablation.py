#!/usr/bin/env python3
"""What each part of RFMedSAM 2 contributes: stage-2 variants against stage 1 on the demo's held-back cases.

Run after `make demo` (or `python3 scripts/demo.py`): it reuses the demo's workspace, its stage 1 (the prompt
UNet, which is the nnU-Net baseline there), its stage-1 predictions of the held-back cases and its cascade (the
default refiner). Each variant changes ONE setting of the default refiner and is trained and predicted with the
demo's recipe (budget, split, prediction flags) by the stock commands, in a workspace of its own beside the
demo's. Every variant is compared with stage 1 by the compare command: Dice, NSD, the paired difference of the
per-case mean Dice with its 95% bootstrap interval, wins/ties/losses. A benchmark, not a test: each variant
takes some ten minutes on 2 CPU cores.

Without official SAM 2 weights (RFMEDSAM2_SAM2_CHECKPOINT unset), SAM 2 runs from RANDOM weights: the table then
shows what each part does to a refiner whose frozen encoder sees nothing useful, that is how far each variant
can fall below its prompt in a short training, not what it adds with real weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from demo import DATASET_ID, DATASET_NAME, DEMO_RECIPE  # noqa: E402
from nnunetv2_rfmedsam.evaluation.compare import FOREGROUND_MEAN, compare_folders  # noqa: E402
from nnunetv2_rfmedsam.holdout import budget_env, run_logged, workspace_env  # noqa: E402
from nnunetv2_rfmedsam.settings import PLANS_IDENTIFIER, STAGE1_CONFIGURATION, STAGE1_TRAINER, \
    STAGE2_CONFIGURATION, STAGE2_TRAINER  # noqa: E402

DEFAULT = "default (starts at prompt, 2 passes, memory, click training)"
# each variant: the settings it changes from the default refiner
VARIANTS = {
    "plain refiner (the paper's)": {"start_at_prompt": False},
    "one pass": {"refinement_passes": 1},
    "no memory": {"use_memory": False},
    "no click training": {"train_with_clicks": False},
}
STAGE2_FOLD = "0"  # the demo's stage-2 split (stage 1 on fold all, two validation cases)


def variant_workspace(demo: Path, root: Path, changes: dict) -> tuple[Path, Path]:
    """Preprocessed and results folders for one variant: the demo's data and stage 1, linked; the plans with the
    variant's stage-2 settings."""
    preprocessed, results = root / "nnUNet_preprocessed" / DATASET_NAME, root / "nnUNet_results" / DATASET_NAME
    preprocessed.mkdir(parents=True)
    results.mkdir(parents=True)
    source = demo / "nnUNet_preprocessed" / DATASET_NAME
    for entry in source.iterdir():
        if entry.name != f"{PLANS_IDENTIFIER}.json":
            (preprocessed / entry.name).symlink_to(entry)
    plans = json.loads((source / f"{PLANS_IDENTIFIER}.json").read_text())
    plans["configurations"][STAGE2_CONFIGURATION]["architecture"]["arch_kwargs"].update(changes)
    (preprocessed / f"{PLANS_IDENTIFIER}.json").write_text(json.dumps(plans, indent=1))
    stage1 = f"{STAGE1_TRAINER}__{PLANS_IDENTIFIER}__{STAGE1_CONFIGURATION}"
    (results / stage1).symlink_to(demo / "nnUNet_results" / DATASET_NAME / stage1)
    return root / "nnUNet_preprocessed", root / "nnUNet_results"


def summary_rows(metrics: dict) -> list[dict]:
    return [{"method": method, "dice": summary["foreground_mean"]["dice"], "nsd": summary["foreground_mean"]["nsd"],
             "paired": metrics["paired"].get(method, {}).get(FOREGROUND_MEAN)}
            for method, summary in metrics["methods"].items()]


def markdown_table(rows: list[dict], baseline: str) -> str:
    lines = [f"| method | mean Dice | mean NSD | Dice − {baseline}, per case [95% CI] | wins / ties / losses |",
             "|---|---|---|---|---|"]
    for row in rows:
        paired = row["paired"]
        diff = "—" if paired is None else (f"{paired['dice_diff_mean']:+.4f} [{paired['ci95'][0]:+.4f}, "
                                           f"{paired['ci95'][1]:+.4f}]")
        wtl = "—" if paired is None else f"{paired['wins']} / {paired['ties']} / {paired['losses']}"
        lines.append(f"| {row['method']} | {row['dice']:.4f} | {row['nsd']:.4f} | {diff} | {wtl} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "demo_output", help="the demo's workspace")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    started = time.time()
    demo = args.demo.resolve()
    predictions = demo / "predictions"
    for needed in (predictions / "stage1", predictions / "cascade"):
        if not needed.is_dir():
            sys.exit(f"{needed} does not exist: run the demo first (make demo)")
    output = demo / "ablation"
    if output.exists():
        sys.exit(f"{output} exists: remove it to run the ablation again")
    raw = demo / "nnUNet_raw" / DATASET_NAME
    checkpoint = os.environ.get("RFMEDSAM2_SAM2_CHECKPOINT")
    print(f"ablation on the demo's held-back cases with the demo recipe: {json.dumps(DEMO_RECIPE.describe())}")
    print(f"SAM 2 weights: {checkpoint or 'RANDOM (no official checkpoint here)'}; stage-2 training prompts: "
          f"{DEMO_RECIPE.stage2_prompts}")
    methods = {"stage 1 (nnU-Net)": predictions / "stage1", DEFAULT: predictions / "cascade"}
    for number, (name, changes) in enumerate((n, VARIANTS[n]) for n in args.variants):
        root = output / f"variant{number}"
        preprocessed, results = variant_workspace(demo, root, changes)
        env = workspace_env(demo, dict(os.environ, nnUNet_compile="f"))
        env.update(nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results))
        if not checkpoint:
            env["RFMEDSAM2_ALLOW_RANDOM_INIT"] = "1"
        print(f"\nvariant {number}: {name} ({changes})")
        common = ["-p", PLANS_IDENTIFIER, "-device", DEMO_RECIPE.device]
        run_logged(["nnUNetv2_train", str(DATASET_ID), STAGE2_CONFIGURATION, STAGE2_FOLD, "-tr", STAGE2_TRAINER,
                    *common], dict(env, **budget_env(DEMO_RECIPE.stage2_budget)), root / "train.log")
        run_logged(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(root / "predictions"), "-d",
                    str(DATASET_ID), "-c", STAGE2_CONFIGURATION, "-tr", STAGE2_TRAINER, "-f", STAGE2_FOLD,
                    "-prev_stage_predictions", str(predictions / "stage1"), "-npp", "1", "-nps", "1",
                    *DEMO_RECIPE.predict_flags, *common], env, root / "predict.log")
        methods[name] = root / "predictions"
    metrics = compare_folders(raw / "labelsTs", {k: str(v) for k, v in methods.items()}, output / "compare",
                              labels_json=raw / "dataset.json", num_processes=2, images_dir=raw / "imagesTs")
    rows = summary_rows(metrics)
    weights = "official" if checkpoint else "RANDOM"
    text = (f"Ablation: {len(list((raw / 'labelsTs').iterdir()))} held-back hippocampus cases; demo recipe "
            f"(stage 1 {DEMO_RECIPE.stage1_budget}, stage 2 {DEMO_RECIPE.stage2_budget} epochs/iterations/validation "
            f"iterations, {' '.join(DEMO_RECIPE.sam2_options)}, prediction {' '.join(DEMO_RECIPE.predict_flags)}); "
            f"{weights} SAM 2 weights; in-sample stage-2 training prompts.\n\n{markdown_table(rows, 'stage 1')}\n")
    (output / "ablation.md").write_text(text)
    (output / "ablation.json").write_text(json.dumps(rows, indent=1))
    print("\n" + text)
    print(f"report with per-class figures and plots: {output / 'compare' / 'report.md'}")
    print(f"finished in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
