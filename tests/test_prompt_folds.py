"""Stage 2's training prompts: which stage-1 fold wrote them, no silent overwrite of out-of-fold ones by fold `all`,
and a held-out recipe that trains five folds by default and says so plainly when it does not."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_rfmedsam import holdout
from nnunetv2_rfmedsam.holdout import HoldoutRecipe, RecipeError, evaluate_holdout, print_paired_differences
from nnunetv2_rfmedsam.raw_dataset import write_raw_dataset
from nnunetv2_rfmedsam.trainers.prompt_folds import (OVERWRITE_OOF_PROMPTS_VARIABLE, PROMPT_FOLDS_MANIFEST,
                                                     OutOfFoldPromptsWouldBeOverwritten, check_prompt_overwrite,
                                                     describe_prompt_origin, forget_prompt_folds, read_prompt_folds,
                                                     record_prompt_folds)

from conftest import DATASET_ID, DATASET_NAME, PLANS, STAGE1_BUDGET, STAGE1_FOLDER, bin_command, run_command

CASES = [f"case_{i}" for i in range(10)]


def five_fold_split(cases):
    return [{"train": [c for c in cases if c not in cases[i::5]], "val": cases[i::5]} for i in range(5)]


def write_predictions(folder, cases):
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / f"{case}.b2nd").write_bytes(b"prediction")


def simulate_folds(folder, split):
    """What folds 0-4's final validations leave behind: a prediction of every case, each from its own fold."""
    for fold, keys in enumerate(split):
        forget_prompt_folds(str(folder), keys["val"])
        write_predictions(folder, keys["val"])
        record_prompt_folds(str(folder), fold, keys["val"], keys["train"])


def test_manifest_says_which_fold_wrote_each_case(tmp_path):
    folder = tmp_path / "predicted_next_stage" / "3d_rfmedsam2"
    simulate_folds(folder, five_fold_split(CASES))
    folds = read_prompt_folds(str(folder))
    assert folds == {case: {"fold": i % 5, "out_of_fold": True} for i, case in enumerate(CASES)}
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".b2nd")) == [PROMPT_FOLDS_MANIFEST]

    # fold all afterwards: every case in sample; a validation case whose file was not written is not recorded
    (folder / "case_3.b2nd").unlink()
    forget_prompt_folds(str(folder), CASES)
    assert read_prompt_folds(str(folder)) == {}
    record_prompt_folds(str(folder), "all", CASES, CASES)
    folds = read_prompt_folds(str(folder))
    assert "case_3" not in folds and folds["case_0"] == {"fold": "all", "out_of_fold": False}
    assert len(folds) == 9

    # a split whose validation cases are also training cases gives in-sample prompts too
    record_prompt_folds(str(folder), 0, ["case_0", "case_1"], ["case_1", "case_2"])
    assert read_prompt_folds(str(folder))["case_0"]["out_of_fold"]
    assert not read_prompt_folds(str(folder))["case_1"]["out_of_fold"]


def test_fold_all_refuses_to_overwrite_out_of_fold_predictions(tmp_path):
    folder = tmp_path / "predicted_next_stage" / "3d_rfmedsam2"
    assert check_prompt_overwrite(str(folder), "all", CASES, environ={}) is None  # nothing there yet
    simulate_folds(folder, five_fold_split(CASES))
    with pytest.raises(OutOfFoldPromptsWouldBeOverwritten) as error:
        check_prompt_overwrite(str(folder), "all", CASES, environ={})
    message = str(error.value)
    assert message.startswith("REFUSED") and str(folder) in message and OVERWRITE_OOF_PROMPTS_VARIABLE in message
    assert "OUT-OF-FOLD predictions of 10 case(s)" in message and "fold(s) 0, 1, 2, 3, 4" in message

    warning = check_prompt_overwrite(str(folder), "all", CASES, environ={OVERWRITE_OOF_PROMPTS_VARIABLE: "1"})
    assert warning.startswith("WARNING") and str(folder) in warning and "overwrites the OUT-OF-FOLD" in warning
    # another fold only replaces out-of-fold predictions with out-of-fold ones
    assert check_prompt_overwrite(str(folder), 2, CASES[2::5], environ={}) is None

    # predictions without a manifest (an older version wrote them): a warning, not a refusal
    (folder / PROMPT_FOLDS_MANIFEST).unlink()
    assert "origin unknown" in check_prompt_overwrite(str(folder), "all", CASES, environ={})


def test_prompt_origin_is_described_from_the_manifest(tmp_path):
    folder = tmp_path / "prompts"
    simulate_folds(folder, five_fold_split(CASES))
    assert describe_prompt_origin(str(folder), CASES) == "out-of-fold for all 10 cases (stage-1 folds 0, 1, 2, 3, 4)"
    record_prompt_folds(str(folder), "all", CASES[:4], CASES)
    text = describe_prompt_origin(str(folder), CASES + ["other"])
    assert text.startswith("IN-SAMPLE for 4 of 11 cases (stage 1 fold all predicted its own training cases; "
                           "test-time prompts will be worse)")
    assert "out-of-fold for 6 of 11 cases" in text and "origin unknown for 1 of 11 cases" in text


def test_recipe_says_whether_stage2_prompts_are_in_sample():
    default = HoldoutRecipe().describe()
    assert default["stage-2 training prompts"].startswith("OUT-OF-FOLD")
    assert default["stage 1 and baseline folds"].startswith("0 1 2 3 4")
    short = HoldoutRecipe(stage1_folds="all").describe()
    assert short["stage-2 training prompts"] == ("IN-SAMPLE (stage 1 fold all predicted its own training cases; "
                                                 "test-time prompts will be worse)")
    with pytest.raises(RecipeError):
        HoldoutRecipe(stage1_folds="3fold")


@pytest.fixture
def recorded_holdout(hippocampus_cases, tmp_path, monkeypatch):
    """evaluate_holdout with every command recorded instead of run: returns (run it, the commands)."""
    source, train, test = hippocampus_cases
    write_raw_dataset(source, tmp_path / "raw" / DATASET_NAME, train[:6], test[:1])
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results")}
    commands = []
    monkeypatch.setattr(holdout, "run_logged",
                        lambda command, env, log, *label: commands.append((command, log.name)) or 0.0)
    monkeypatch.setattr("nnunetv2_rfmedsam.evaluation.compare.compare_folders", lambda *a, **k: {"paired": {}})
    return (lambda recipe: evaluate_holdout(DATASET_ID, recipe, env, tmp_path / "out")), commands, train[:6], tmp_path


def test_default_recipe_trains_five_folds_and_predicts_with_their_ensemble(recorded_holdout):
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    run, commands, train, root = recorded_holdout
    run(HoldoutRecipe(stage1_budget=(1, 1, 1), stage2_validation_cases=2))
    trainings = [(c[2], c[c.index("-tr") + 1], c[3], log) for c, log in commands if c[0] == "nnUNetv2_train"]
    folds = [str(f) for f in range(5)]
    assert trainings == [("3d_fullres", "nnUNetTrainerRFPrompt", f, f"train_nnUNetTrainerRFPrompt_fold_{f}.log")
                         for f in folds] + \
                        [("3d_fullres", "nnUNetTrainerBudget", f, f"train_nnUNetTrainerBudget_fold_{f}.log")
                         for f in folds] + \
                        [("3d_rfmedsam2", "nnUNetTrainerRFMedSAM2", "5", "train_nnUNetTrainerRFMedSAM2.log")]
    predictions = {c[c.index("-tr") + 1]: c[c.index("-f") + 1:c.index("-device")]
                   for c, _ in commands if c[0] == "nnUNetv2_predict"}
    assert predictions == {"nnUNetTrainerRFPrompt": folds, "nnUNetTrainerBudget": folds,
                           "nnUNetTrainerRFMedSAM2": ["5"]}

    # nnU-Net's own five-fold split, then stage 2's split as fold 5
    splits = json.loads((root / "pre" / DATASET_NAME / "splits_final.json").read_text())
    assert splits[:5] == [{k: list(map(str, v)) for k, v in s.items()}
                          for s in generate_crossval_split(sorted(train), seed=12345, n_splits=5)]
    assert sorted(c for s in splits[:5] for c in s["val"]) == sorted(train)
    assert len(splits) == 6 and len(splits[5]["val"]) == 2


def test_five_folds_need_five_training_cases(recorded_holdout):
    run, commands, train, root = recorded_holdout
    for case in train[:2]:
        for folder, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            (root / "raw" / DATASET_NAME / folder / name).unlink()
    with pytest.raises(RecipeError, match="at least 5 training cases"):
        run(HoldoutRecipe())
    assert commands == []  # refused before any time was spent
    run(HoldoutRecipe(stage1_folds="all"))
    assert [c[3] for c, _ in commands if c[0] == "nnUNetv2_train"] == ["all", "all", "all"]


def test_paired_differences_are_printed_from_compare_metrics(nnunet_workspace, tmp_path, capsys):
    from nnunetv2_rfmedsam.evaluation.compare import compare_folders
    raw = nnunet_workspace["raw"]
    baseline, candidate = tmp_path / "baseline", tmp_path / "candidate"
    shutil.copytree(raw / "labelsTs", baseline)
    shutil.copytree(raw / "labelsTs", candidate)
    emptied = sorted(candidate.iterdir())[0]  # the candidate misses both classes in one case
    image = sitk.ReadImage(str(emptied))
    blank = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    blank.CopyInformation(image)
    sitk.WriteImage(blank, str(emptied))
    metrics = compare_folders(str(raw / "labelsTs"), {"base": str(baseline), "cand": str(candidate)},
                              str(tmp_path / "compare"), labels_json=str(raw / "dataset.json"))
    print_paired_differences(metrics, {"1": "Anterior", "2": "Posterior"})
    lines = capsys.readouterr().out.splitlines()
    assert "paired Dice difference, candidate - baseline (base)" in lines[1]
    rows = [line.split() for line in lines[3:]]
    n = len(nnunet_workspace["test"])
    assert [row[:3] for row in rows] == [["cand", "Anterior", str(n)], ["cand", "Posterior", str(n)],
                                         ["cand", "mean", str(n)]]
    for row, label in zip(rows, ("1", "2", "foreground_mean")):
        p = metrics["paired"]["cand"][label]
        assert row[3] == f"{p['dice_diff_mean']:+.3f}" and float(row[3]) == pytest.approx(-1 / n, abs=1e-3)
        assert row[-5:] == ["0", "/", str(n - 1), "/", "1"]  # wins / ties / losses


def prompt_folder(workspace):
    return workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "predicted_next_stage" / "3d_rfmedsam2"


def test_stage1_final_validation_writes_the_manifest(stage1_workspace):
    folds = read_prompt_folds(str(prompt_folder(stage1_workspace)))
    assert folds == {case: {"fold": "all", "out_of_fold": False} for case in stage1_workspace["train"]}


def test_stage1_fold_all_stops_before_training_over_out_of_fold_predictions(stage1_workspace):
    folder = prompt_folder(stage1_workspace)
    manifest = folder / PROMPT_FOLDS_MANIFEST
    kept = manifest.read_text()
    files = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd")}
    simulated = {case: {"fold": i % 5, "out_of_fold": True} for i, case in enumerate(stage1_workspace["train"])}
    manifest.write_text(json.dumps({"cases": simulated}))
    try:
        proc = run_command([bin_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-p", PLANS,
                            "-tr", "nnUNetTrainerRFPrompt", "-device", "cpu"],
                           dict(stage1_workspace["env"], **STAGE1_BUDGET), expect_success=False)
        assert proc.returncode != 0
        output = proc.stdout + proc.stderr
        assert "REFUSED: stage 1 fold all's final validation would overwrite the OUT-OF-FOLD predictions" in output
        assert str(folder) in output and OVERWRITE_OOF_PROMPTS_VARIABLE in output
        assert "Epoch 0" not in proc.stdout  # stopped before training
        assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd")} == files
        assert json.loads(manifest.read_text())["cases"] == simulated
    finally:
        manifest.write_text(kept)


def test_stage2_says_its_training_prompts_are_in_sample(stage2_workspace):
    assert "WARNING: Stage-2 training prompts" in stage2_workspace["stage2_log"]
    assert f"IN-SAMPLE for all {len(stage2_workspace['train'])} cases" in stage2_workspace["stage2_log"]
