"""Held-out evaluation: plan, train the baseline, stage 1 and the cascade, predict imagesTs, compare.

`nnUNetv2_rfmedsam_evaluate_holdout -d D` on a raw dataset with imagesTr/labelsTr and a separate
imagesTs/labelsTs. Every step is a stock nnU-Net command (or the plugin's), run as a subprocess and printed,
so the same evaluation can be repeated by hand; each command's output goes to a log file.

The baseline is nnU-Net's default training from the same plans. With a budget, stock `nnUNetTrainer` cannot be
shortened, so the baseline is `nnUNetTrainerBudget` (nnUNetTrainer plus the budget variables). Stage 1
(`nnUNetTrainerRFPrompt`) is that very training too; `--baseline stage1` uses it as the baseline instead of
training the same recipe a second time (which would only measure run-to-run noise), for budgets where
time is short.

Stage 2 learns from stage 1's predictions of the training cases, and should see them as it will at test time.
By default (`--stage1-folds 5fold`) stage 1 and the baseline train folds 0-4 of nnU-Net's own five-fold split
(written to splits_final.json): each fold's final validation writes the OUT-OF-FOLD prediction of its validation
cases into stage 1's `predicted_next_stage/3d_rfmedsam2/`, and imagesTs is predicted by the ensemble of the five
(`-f 0 1 2 3 4`). This needs at least 5 training cases. `--stage1-folds all` trains one model on every case
instead (five times shorter, for demos and tests): its final validation predicts its own training cases, so stage 2
learns from IN-SAMPLE, nearly perfect prompts and sees worse ones at test time; the recipe says so when it prints.
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

from nnunetv2_rfmedsam.log_progress import LogProgress
from nnunetv2_rfmedsam.settings import PLANS_IDENTIFIER, STAGE1_CONFIGURATION, STAGE1_TRAINER, STAGE2_CONFIGURATION, \
    STAGE2_TRAINER

PROGRESS_POLL_SECONDS = 1.0
BUDGET_VARIABLES = ("RFMEDSAM2_NUM_EPOCHS", "RFMEDSAM2_ITERS_PER_EPOCH", "RFMEDSAM2_VAL_ITERS")
STAGE1_FOLDS = {"5fold": ["0", "1", "2", "3", "4"], "all": ["all"]}
IN_SAMPLE_PROMPTS = "IN-SAMPLE (stage 1 fold all predicted its own training cases; test-time prompts will be worse)"
OUT_OF_FOLD_PROMPTS = ("OUT-OF-FOLD (each training case predicted by the stage-1 fold that did not train on it, "
                       "as test cases are)")


class CommandFailed(RuntimeError):
    pass


class RecipeError(ValueError):
    pass


def run_logged(command: list[str], env: dict, log: Path, label: str | None = None) -> float:
    """Run one command with its output in `log`; print the command, its progress (epochs, predicted cases: see
    log_progress.py) under `label`, and its duration. Fails with the log's tail."""
    print(f"\n$ {' '.join(shlex.quote(c) for c in command)}", flush=True)
    start = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    progress = LogProgress(label or command[0])
    with open(log, "w") as handle, open(log, errors="replace") as reader:
        proc = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        pending = ""
        while True:
            finished = proc.poll() is not None
            pending += reader.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                for shown in progress.feed(line):
                    print(shown, flush=True)
            if finished:
                break
            time.sleep(PROGRESS_POLL_SECONDS)
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
    # >0: stage 2 trains an extra split with this many validation cases (fold 5 after the five stage-1 folds, fold 0
    # with stage1_folds="all") instead of fold `all`, whose final validation runs SAM 2 over every training case
    stage2_validation_cases: int = 0
    sam2_options: list[str] = field(default_factory=list)
    # stock nnUNetv2_predict flags, the same for every method so that the comparison stays fair
    predict_flags: list[str] = field(default_factory=list)
    device: str = "cpu"
    num_processes: int = 2
    # "5fold": stage 1 and the baseline train folds 0-4 (out-of-fold prompts for stage 2, imagesTs predicted by
    # their ensemble); "all": fold `all` only, five times shorter, but stage 2 trains on in-sample prompts
    stage1_folds: str = "5fold"

    def __post_init__(self):
        if self.stage1_folds not in STAGE1_FOLDS:
            raise RecipeError(f"stage1_folds={self.stage1_folds!r}: use one of {', '.join(STAGE1_FOLDS)}")

    @property
    def stage1_fold_names(self) -> list[str]:
        return STAGE1_FOLDS[self.stage1_folds]

    @property
    def stage2_prompts(self) -> str:
        return IN_SAMPLE_PROMPTS if self.stage1_folds == "all" else OUT_OF_FOLD_PROMPTS

    def describe(self) -> dict:
        return {"stage 1 budget (epochs, iterations, val iterations)": self.stage1_budget or "nnU-Net default",
                "stage 2 budget": self.stage2_budget or "nnU-Net default",
                "baseline": "stage 1 (nnUNetTrainerRFPrompt = nnU-Net's default training)"
                if self.baseline == "stage1" else "trained separately",
                "stage 1 and baseline folds": "all (one model trained on every training case)"
                if self.stage1_folds == "all" else "0 1 2 3 4 (five-fold cross-validation; imagesTs predicted by "
                                                   "the ensemble of the five)",
                "stage-2 training prompts": self.stage2_prompts,
                "stage 2 validation cases": self.stage2_validation_cases or "fold all",
                "SAM 2 planner options": " ".join(self.sam2_options) or "defaults",
                "prediction flags (all methods)": " ".join(self.predict_flags) or "nnU-Net defaults",
                "device": self.device}


def workspace_env(workdir: Path, base: dict | None = None) -> dict:
    """The environment of the stock nnU-Net commands for a workspace of its own: raw, preprocessed and results
    folders under `workdir`, the plugin's trainers on nnUNet_extTrainer, one augmentation worker and as many export
    processes as cores (nnU-Net's default of 8 starves the predictor on a small CPU)."""
    env = dict(os.environ if base is None else base)
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"),
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"),
               nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", str(os.cpu_count())))
    env["nnUNet_extTrainer"] = subprocess.run(["nnUNetv2_rfmedsam_ext_path"], env=env, capture_output=True,
                                              text=True, check=True).stdout.strip()
    return env


def budget_env(budget: tuple[int, int, int] | None) -> dict:
    return {} if budget is None else dict(zip(BUDGET_VARIABLES, map(str, budget)))


def stage2_split(train_cases: list[str], num_validation: int) -> dict:
    validation = train_cases[:: max(1, len(train_cases) // num_validation)][:num_validation]
    return {"train": [c for c in train_cases if c not in validation], "val": validation}


def require_five_cases(train_cases: list[str]) -> None:
    if len(train_cases) < 5:
        raise RecipeError(f"five-fold cross-validation needs at least 5 training cases, found {len(train_cases)}: "
                          f"add cases, or use --stage1-folds all (in-sample stage-2 training prompts)")


def write_splits(preprocessed: Path, train_cases: list[str], stage1_folds: str, stage2_validation_cases: int) -> str:
    """Write splits_final.json, shared by every training of the dataset; return stage 2's fold.

    "5fold": nnU-Net's own seeded five-fold split (what `nnUNetTrainer.do_split` would create) comes first, so that
    a stale file cannot change it; stage 2's split, if any, follows as fold 5. "all": stage 2's split is fold 0.
    Without a stage-2 split, stage 2 trains fold `all`.
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = []
    if stage1_folds == "5fold":
        require_five_cases(train_cases)
        splits = [{key: [str(c) for c in value] for key, value in split.items()}
                  for split in generate_crossval_split(sorted(train_cases), seed=12345, n_splits=5)]
    if stage2_validation_cases:
        splits.append(stage2_split(train_cases, stage2_validation_cases))
    if splits:
        preprocessed.mkdir(parents=True, exist_ok=True)
        (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))
    return str(len(splits) - 1) if stage2_validation_cases else "all"


def stage1_prompt_folder(env: dict, dataset_name: str) -> Path:
    """Where stage 1's final validations write stage 2's training prompts (and their manifest)."""
    return (Path(env["nnUNet_results"]) / dataset_name / f"{STAGE1_TRAINER}__{PLANS_IDENTIFIER}__{STAGE1_CONFIGURATION}"
            / "predicted_next_stage" / STAGE2_CONFIGURATION)


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
    train_cases = list_cases(raw)
    if recipe.stage1_folds == "5fold":
        require_five_cases(train_cases)  # before any time is spent
    logs = output / "logs"
    d = str(dataset_id)
    run_logged(["nnUNetv2_rfmedsam_plan_and_preprocess", "-d", d, "-c", STAGE1_CONFIGURATION, STAGE2_CONFIGURATION,
                "-np", str(recipe.num_processes), "-npfp", str(recipe.num_processes), "--no_pbar",
                *recipe.sam2_options], env, logs / "plan_and_preprocess.log")
    stage2_fold = write_splits(Path(env["nnUNet_preprocessed"]) / name, train_cases, recipe.stage1_folds,
                               recipe.stage2_validation_cases)
    stage1_folds = recipe.stage1_fold_names

    def train(configuration, folds, trainer, budget):
        for fold in folds:
            log = f"train_{trainer}.log" if len(folds) == 1 else f"train_{trainer}_fold_{fold}.log"
            run_logged(["nnUNetv2_train", d, configuration, fold, "-p", PLANS_IDENTIFIER, "-tr", trainer,
                        "-device", recipe.device], dict(env, **budget_env(budget)), logs / log,
                       f"{trainer} fold {fold}")

    def predict(configuration, folds, trainer, out, *extra):
        run_logged(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", d, "-c", configuration,
                    "-p", PLANS_IDENTIFIER, "-tr", trainer, "-f", *folds, "-device", recipe.device,
                    "-npp", "1", "-nps", "1", *recipe.predict_flags, *extra], env, logs / f"predict_{trainer}.log",
                   f"{trainer} predicts imagesTs")

    baseline_trainer = STAGE1_TRAINER if recipe.baseline == "stage1" else \
        ("nnUNetTrainer" if recipe.stage1_budget is None else "nnUNetTrainerBudget")
    # each stage-1 fold's final validation writes the prompts of its validation cases: folds 0-4 out of fold,
    # fold `all` in sample (every training case)
    train(STAGE1_CONFIGURATION, stage1_folds, STAGE1_TRAINER, recipe.stage1_budget)
    from nnunetv2_rfmedsam.trainers.prompt_folds import describe_prompt_origin
    prompts = stage1_prompt_folder(env, name)
    print(f"\nstage-2 training prompts (stage 1's manifest in {prompts}): "
          f"{describe_prompt_origin(prompts, train_cases)}", flush=True)
    if baseline_trainer != STAGE1_TRAINER:
        train(STAGE1_CONFIGURATION, stage1_folds, baseline_trainer, recipe.stage1_budget)
    train(STAGE2_CONFIGURATION, [stage2_fold], STAGE2_TRAINER, recipe.stage2_budget)

    predictions = output / "predictions"
    predict(STAGE1_CONFIGURATION, stage1_folds, STAGE1_TRAINER, predictions / "stage1")
    if baseline_trainer != STAGE1_TRAINER:
        predict(STAGE1_CONFIGURATION, stage1_folds, baseline_trainer, predictions / "baseline")
    predict(STAGE2_CONFIGURATION, [stage2_fold], STAGE2_TRAINER, predictions / "cascade",
            "-prev_stage_predictions", str(predictions / "stage1"))

    methods = {f"nnU-Net ({baseline_trainer})": predictions / ("stage1" if baseline_trainer == STAGE1_TRAINER
                                                               else "baseline")}
    if baseline_trainer != STAGE1_TRAINER:
        methods[f"stage 1 ({STAGE1_TRAINER})"] = predictions / "stage1"
    methods["RFMedSAM 2 cascade"] = predictions / "cascade"
    print(f"\n$ nnUNetv2_rfmedsam_compare --gt {raw / 'labelsTs'} "
          + " ".join(f"--pred '{k}={v}'" for k, v in methods.items())
          + f" --images {raw / 'imagesTs'} -o {output / 'compare'}", flush=True)
    return compare_folders(raw / "labelsTs", {k: str(v) for k, v in methods.items()}, output / "compare",
                           labels_json=raw / "dataset.json", num_processes=recipe.num_processes,
                           images_dir=raw / "imagesTs")


def print_dice_table(metrics: dict, label_names: dict[str, str]) -> None:
    print(f"\n{'method':44s}" + "".join(f"{label_names[k]:>12s}" for k in label_names) + f"{'mean':>10s}")
    for method, summary in metrics["methods"].items():
        row = "".join(f"{summary['per_class'][k]['dice']['mean']:12.3f}" for k in label_names)
        print(f"{method:44s}{row}{summary['foreground_mean']['dice']:10.3f}")


def print_figure_locations(compare_dir: Path) -> None:
    """Where the compare command's pictures are: the plots and the contour figures of the cases to look at."""
    contours = sorted(compare_dir.glob("contours_*.png"))
    print(f"plots: {compare_dir / 'dice_per_class.png'}, {compare_dir / 'paired_cases.png'}")
    print("contours of the cases to look at (largest loss, largest gain, median case; linked from report.md): "
          + ", ".join(str(path) for path in contours))


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def print_paired_differences(metrics: dict, label_names: dict[str, str]) -> None:
    """Each candidate against the baseline, per class and for each case's mean over the classes, from compare's
    paired statistics: mean Dice difference (candidate - baseline) over the cases both predicted, its 95%
    bootstrap interval, wins / ties / losses."""
    paired = metrics["paired"]
    if not paired:
        return
    print(f"\npaired Dice difference, candidate - baseline ({metrics['settings']['baseline']}), per case:")
    print(f"{'method':44s}{'class':>12s}{'cases':>7s}{'mean diff':>11s}{'95% interval':>20s}{'wins/ties/losses':>18s}")
    from nnunetv2_rfmedsam.evaluation.compare import FOREGROUND_MEAN
    rows = {**label_names, FOREGROUND_MEAN: "mean"}
    for method, per_class in paired.items():
        for label, name in rows.items():
            p = per_class[label]
            low, high = p["ci95"] if p["ci95"] else (None, None)
            print(f"{method:44s}{name:>12s}{p['n_cases']:7d}{_signed(p['dice_diff_mean']):>11s}"
                  f"{'[' + _signed(low) + ', ' + _signed(high) + ']':>20s}"
                  f"{str(p['wins']) + ' / ' + str(p['ties']) + ' / ' + str(p['losses']):>18s}")


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
    parser.add_argument("--stage1-folds", choices=list(STAGE1_FOLDS), default="5fold",
                        help="5fold (default): stage 1 and the baseline train folds 0-4, so stage 2 trains on "
                             "out-of-fold prompts, and imagesTs is predicted by their ensemble (needs >= 5 training "
                             "cases); all: fold all only, five times shorter, but stage 2's training prompts are "
                             "in-sample (stage 1 predicted its own training cases) and better than at test time")
    parser.add_argument("--stage2-validation-cases", type=int, default=0,
                        help="train stage 2 on an extra split with this many validation cases (fold 5 after the "
                             "five folds, fold 0 with --stage1-folds all; default: fold all)")
    parser.add_argument("--sam2-options", default="", help="planner options, e.g. '--sam2-image-size 256'")
    parser.add_argument("--predict-flags", default="", help="stock nnUNetv2_predict flags for every method, "
                                                           "e.g. '--disable_tta -step_size 1'")
    parser.add_argument("-device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("-np", type=int, default=2, help="processes for preprocessing and the comparison")
    args = parser.parse_args(argv)
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(variable):
            parser.error(f"{variable} is not set")
    recipe = HoldoutRecipe(stage1_budget=args.stage1_budget, stage2_budget=args.stage2_budget, baseline=args.baseline,
                           stage2_validation_cases=args.stage2_validation_cases,
                           sam2_options=shlex.split(args.sam2_options), predict_flags=shlex.split(args.predict_flags),
                           device=args.device, num_processes=args.np, stage1_folds=args.stage1_folds)
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = subprocess.run(["nnUNetv2_rfmedsam_ext_path"], env=env, capture_output=True,
                                              text=True, check=True).stdout.strip()
    print(json.dumps(recipe.describe(), indent=1))
    try:
        metrics = evaluate_holdout(args.d, recipe, env, args.o)
    except (CommandFailed, FileNotFoundError, RecipeError) as error:
        sys.exit(f"error: {error}")
    labels = json.loads((raw_dataset_folder(args.d, env) / "dataset.json").read_text())
    label_names = {str(v): k for k, v in labels["labels"].items() if v != 0}
    print_dice_table(metrics, label_names)
    print_paired_differences(metrics, label_names)
    print(f"\nstage-2 training prompts: {recipe.stage2_prompts}")
    print(f"\nreport: {args.o / 'compare' / 'report.md'}")
    print_figure_locations(args.o / "compare")


if __name__ == "__main__":
    main()
