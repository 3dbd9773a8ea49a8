"""Held-out evaluation: plan, train the baseline, stage 1 and the cascade, predict imagesTs, compare.

`nnUNetv2_rfmedsam_evaluate_holdout -d D` on a raw dataset with imagesTr/labelsTr and a separate
imagesTs/labelsTs. Every step is a stock nnU-Net command (or the plugin's), run as a subprocess and printed,
so the same evaluation can be repeated by hand; each command's output goes to a log file.

The baseline is nnU-Net's default training from the same plans. With a budget, stock `nnUNetTrainer` cannot be
shortened, so the baseline is `nnUNetTrainerBudget` (nnUNetTrainer plus the budget variables). Stage 1
(`nnUNetTrainerRFPrompt`) is that very training too; `--baseline stage1` uses it as the baseline instead of
training the same recipe a second time (which would only measure run-to-run noise), for budgets where
time is short.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_rfmedsam.settings import PLANS_IDENTIFIER, STAGE1_CONFIGURATION, STAGE1_TRAINER, STAGE2_CONFIGURATION, \
    STAGE2_TRAINER

BUDGET_VARIABLES = ("RFMEDSAM2_NUM_EPOCHS", "RFMEDSAM2_ITERS_PER_EPOCH", "RFMEDSAM2_VAL_ITERS")


class CommandFailed(RuntimeError):
    pass


def run_logged(command: list[str], env: dict, log: Path) -> float:
    """Run one command with its output in `log`; print the command and its duration. Fails with the log's tail."""
    print(f"\n$ {' '.join(shlex.quote(c) for c in command)}", flush=True)
    start = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        proc = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise CommandFailed(f"{tail}\n{command[0]} failed (exit {proc.returncode}) after {seconds:.0f} s; log: {log}")
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


@dataclass
class HoldoutRecipe:
    """What to train and how long; `None` budgets mean nnU-Net's full recipe."""
    stage1_budget: tuple[int, int, int] | None = None
    stage2_budget: tuple[int, int, int] | None = None
    baseline: str = "separate"  # or "stage1"
    # >0: stage 2 trains fold 0 of a split with this many validation cases instead of fold `all`, whose
    # final validation runs SAM 2 over every training case
    stage2_validation_cases: int = 0
    sam2_options: list[str] = field(default_factory=list)
    # stock nnUNetv2_predict flags, the same for every method so that the comparison stays fair
    predict_flags: list[str] = field(default_factory=list)
    device: str = "cpu"
    num_processes: int = 2

    def describe(self) -> dict:
        return {"stage 1 budget (epochs, iterations, val iterations)": self.stage1_budget or "nnU-Net default",
                "stage 2 budget": self.stage2_budget or "nnU-Net default",
                "baseline": "stage 1 (nnUNetTrainerRFPrompt = nnU-Net's default training)"
                if self.baseline == "stage1" else "trained separately",
                "stage 2 validation cases": self.stage2_validation_cases or "fold all",
                "SAM 2 planner options": " ".join(self.sam2_options) or "defaults",
                "prediction flags (all methods)": " ".join(self.predict_flags) or "nnU-Net defaults",
                "device": self.device}


def budget_env(budget: tuple[int, int, int] | None) -> dict:
    return {} if budget is None else dict(zip(BUDGET_VARIABLES, map(str, budget)))


def write_stage2_split(preprocessed: Path, train_cases: list[str], num_validation: int) -> None:
    validation = train_cases[:: max(1, len(train_cases) // num_validation)][:num_validation]
    split = [{"train": [c for c in train_cases if c not in validation], "val": validation}]
    (preprocessed / "splits_final.json").write_text(json.dumps(split, indent=1))


def raw_dataset_folder(dataset_id: int, env: dict) -> Path:
    """`$nnUNet_raw/DatasetXXX_Name` from `env` (nnU-Net's own lookup reads the variables at import time)."""
    matches = sorted(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset_id:03d}_*"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one folder Dataset{dataset_id:03d}_* in {env['nnUNet_raw']}, "
                                f"found {len(matches)}")
    return matches[0]


def evaluate_holdout(dataset_id: int, recipe: HoldoutRecipe, env: dict, output: Path) -> dict:
    """Run the whole held-out evaluation; returns compare's metrics (also in `output/compare`)."""
    from nnunetv2_rfmedsam.evaluation.compare import compare_folders
    from nnunetv2_rfmedsam.raw_dataset import list_cases

    raw = raw_dataset_folder(dataset_id, env)
    name = raw.name
    for folder in ("imagesTs", "labelsTs"):
        if not (raw / folder).is_dir():
            raise FileNotFoundError(f"{raw / folder} does not exist: the held-out evaluation needs test images "
                                    f"and their labels beside imagesTr/labelsTr")
    logs = output / "logs"
    d = str(dataset_id)
    run_logged(["nnUNetv2_rfmedsam_plan_and_preprocess", "-d", d, "-c", STAGE1_CONFIGURATION, STAGE2_CONFIGURATION,
                "-np", str(recipe.num_processes), "-npfp", str(recipe.num_processes), "--no_pbar",
                *recipe.sam2_options], env, logs / "plan_and_preprocess.log")
    stage2_fold = "all"
    if recipe.stage2_validation_cases:
        write_stage2_split(Path(env["nnUNet_preprocessed"]) / name, list_cases(raw), recipe.stage2_validation_cases)
        stage2_fold = "0"

    def train(configuration, fold, trainer, budget):
        run_logged(["nnUNetv2_train", d, configuration, fold, "-p", PLANS_IDENTIFIER, "-tr", trainer,
                    "-device", recipe.device], dict(env, **budget_env(budget)), logs / f"train_{trainer}.log")

    def predict(configuration, fold, trainer, out, *extra):
        run_logged(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", d, "-c", configuration,
                    "-p", PLANS_IDENTIFIER, "-tr", trainer, "-f", fold, "-device", recipe.device,
                    "-npp", "1", "-nps", "1", *recipe.predict_flags, *extra], env, logs / f"predict_{trainer}.log")

    baseline_trainer = STAGE1_TRAINER if recipe.baseline == "stage1" else \
        ("nnUNetTrainer" if recipe.stage1_budget is None else "nnUNetTrainerBudget")
    # stage 1 on fold `all`: its final validation then writes a prompt for every training case
    train(STAGE1_CONFIGURATION, "all", STAGE1_TRAINER, recipe.stage1_budget)
    if baseline_trainer != STAGE1_TRAINER:
        train(STAGE1_CONFIGURATION, "all", baseline_trainer, recipe.stage1_budget)
    train(STAGE2_CONFIGURATION, stage2_fold, STAGE2_TRAINER, recipe.stage2_budget)

    predictions = output / "predictions"
    predict(STAGE1_CONFIGURATION, "all", STAGE1_TRAINER, predictions / "stage1")
    if baseline_trainer != STAGE1_TRAINER:
        predict(STAGE1_CONFIGURATION, "all", baseline_trainer, predictions / "baseline")
    predict(STAGE2_CONFIGURATION, stage2_fold, STAGE2_TRAINER, predictions / "cascade",
            "-prev_stage_predictions", str(predictions / "stage1"))

    methods = {f"nnU-Net ({baseline_trainer})": predictions / ("stage1" if baseline_trainer == STAGE1_TRAINER
                                                               else "baseline")}
    if baseline_trainer != STAGE1_TRAINER:
        methods[f"stage 1 ({STAGE1_TRAINER})"] = predictions / "stage1"
    methods["RFMedSAM 2 cascade"] = predictions / "cascade"
    print(f"\n$ nnUNetv2_rfmedsam_compare --gt {raw / 'labelsTs'} "
          + " ".join(f"--pred '{k}={v}'" for k, v in methods.items()) + f" -o {output / 'compare'}", flush=True)
    return compare_folders(raw / "labelsTs", {k: str(v) for k, v in methods.items()}, output / "compare",
                           labels_json=raw / "dataset.json", num_processes=recipe.num_processes)


def print_dice_table(metrics: dict, label_names: dict[str, str]) -> None:
    print(f"\n{'method':44s}" + "".join(f"{label_names[k]:>12s}" for k in label_names) + f"{'mean':>10s}")
    for method, summary in metrics["methods"].items():
        row = "".join(f"{summary['per_class'][k]['dice']['mean']:12.3f}" for k in label_names)
        print(f"{method:44s}{row}{summary['foreground_mean']['dice']:10.3f}")


def _budget(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give EPOCHS,ITERATIONS,VAL_ITERATIONS as three positive integers")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_rfmedsam_evaluate_holdout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", type=int, required=True, help="dataset id (in $nnUNet_raw, with imagesTs/labelsTs)")
    parser.add_argument("-o", type=Path, required=True, help="output folder: predictions, logs, compare report")
    parser.add_argument("--stage1-budget", type=_budget, help="EPOCHS,ITERATIONS,VAL_ITERATIONS for stage 1 and "
                                                             "the baseline (default: nnU-Net's full recipe)")
    parser.add_argument("--stage2-budget", type=_budget, help="EPOCHS,ITERATIONS,VAL_ITERATIONS for stage 2")
    parser.add_argument("--baseline", choices=["separate", "stage1"], default="separate",
                        help="train the baseline separately (default) or use stage 1, which is the same training")
    parser.add_argument("--stage2-validation-cases", type=int, default=0,
                        help="train stage 2 on fold 0 of a split with this many validation cases (default: fold all)")
    parser.add_argument("--sam2-options", default="", help="planner options, e.g. '--sam2-image-size 256'")
    parser.add_argument("--predict-flags", default="", help="stock nnUNetv2_predict flags for every method, "
                                                           "e.g. '--disable_tta -step_size 1'")
    parser.add_argument("-device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("-np", type=int, default=2, help="processes for preprocessing and the comparison")
    args = parser.parse_args(argv)
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(variable):
            parser.error(f"{variable} is not set")
    recipe = HoldoutRecipe(args.stage1_budget, args.stage2_budget, args.baseline, args.stage2_validation_cases,
                           shlex.split(args.sam2_options), shlex.split(args.predict_flags), args.device, args.np)
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = subprocess.run(["nnUNetv2_rfmedsam_ext_path"], env=env, capture_output=True,
                                              text=True, check=True).stdout.strip()
    print(json.dumps(recipe.describe(), indent=1))
    try:
        metrics = evaluate_holdout(args.d, recipe, env, args.o)
    except (CommandFailed, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    labels = json.loads((raw_dataset_folder(args.d, env) / "dataset.json").read_text())
    print_dice_table(metrics, {str(v): k for k, v in labels["labels"].items() if v != 0})
    print(f"\nreport: {args.o / 'compare' / 'report.md'}")


if __name__ == "__main__":
    main()
