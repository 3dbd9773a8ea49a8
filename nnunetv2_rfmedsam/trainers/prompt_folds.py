"""The manifest that says which stage-1 fold wrote each of stage 2's training prompts.

nnU-Net's final validation (`nnUNetTrainer.perform_actual_validation`) writes each validation case's prediction
into `<stage-1 output>/predicted_next_stage/<next configuration>/`, ONE folder shared by every fold. After folds
0-4 every training case has an out-of-fold prediction there; fold `all` validates on its own training cases and
writes in-sample ones over them, without a word. The manifest `rfmedsam_prompt_folds.json` in that folder records,
per case, the fold that wrote it and whether that fold had trained on the case.
"""
from __future__ import annotations

import json
import os
from os.path import join

from nnunetv2_rfmedsam.atomic_files import replacing

PROMPT_FOLDS_MANIFEST = "rfmedsam_prompt_folds.json"
OVERWRITE_OOF_PROMPTS_VARIABLE = "RFMEDSAM2_OVERWRITE_OOF_PROMPTS"
IN_SAMPLE_EXPLANATION = "stage 1 fold all predicted its own training cases; test-time prompts will be worse"


class OutOfFoldPromptsWouldBeOverwritten(RuntimeError):
    pass


def read_prompt_folds(folder: str) -> dict[str, dict] | None:
    """{case: {"fold": 0..4 or "all", "out_of_fold": bool}} from `folder`'s manifest; None without one."""
    path = join(folder, PROMPT_FOLDS_MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return dict(json.load(handle)["cases"])


def write_prompt_folds(folder: str, cases: dict[str, dict]) -> None:
    """Write the manifest atomically (a temporary file in the same folder, then `os.replace`)."""
    path = join(folder, PROMPT_FOLDS_MANIFEST)
    content = {"meaning": "case -> the stage-1 fold whose final validation wrote this case's prediction in this "
                          "folder; out_of_fold: that fold did not train on the case (folds 0-4 of a "
                          "cross-validation), false for fold all (in-sample)",
               "written_by": "nnUNetTrainerRFPrompt.perform_actual_validation",
               "cases": dict(sorted(cases.items()))}
    os.makedirs(folder, exist_ok=True)
    with replacing(path) as temporary, open(temporary, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def predictions_present(folder: str) -> set[str]:
    """Cases with a prediction file in `folder` (the manifest itself is not one)."""
    if not os.path.isdir(folder):
        return set()
    return {name.split(".")[0] for name in os.listdir(folder)
            if not name.startswith(PROMPT_FOLDS_MANIFEST) and not name.startswith(".")}


def forget_prompt_folds(folder: str, cases) -> None:
    """Drop `cases` from the manifest before they are rewritten: an interrupted validation leaves them unknown,
    never attributed to the fold that wrote them before."""
    folds = read_prompt_folds(folder)
    cases = set(cases)
    if folds is not None and cases & set(folds):
        write_prompt_folds(folder, {case: entry for case, entry in folds.items() if case not in cases})


def record_prompt_folds(folder: str, fold, validation_cases, training_cases) -> None:
    """After a final validation: each validation case whose prediction exists came from `fold`; it is out of fold
    unless that fold also trained on it (fold `all`, or a custom split whose validation overlaps its training)."""
    present, trained = predictions_present(folder), set(training_cases)
    folds = read_prompt_folds(folder) or {}
    folds.update({case: {"fold": fold, "out_of_fold": case not in trained}
                  for case in validation_cases if case in present})
    write_prompt_folds(folder, folds)


def check_prompt_overwrite(folder: str, fold, cases, environ=os.environ) -> str | None:
    """Before stage-1 fold `fold` writes predictions of `cases` into `folder`.

    Fold `all` over out-of-fold predictions (manifest entries of folds 0-4) raises
    `OutOfFoldPromptsWouldBeOverwritten`, unless `RFMEDSAM2_OVERWRITE_OOF_PROMPTS=1`; then, and for predictions
    with no manifest entry (written by an older version), it returns a warning. Otherwise it returns None.
    """
    if fold != "all":
        return None
    present = predictions_present(folder) & set(cases)
    if not present:
        return None
    folds = read_prompt_folds(folder) or {}
    out_of_fold = sorted(c for c in present if c in folds and folds[c]["out_of_fold"])
    unknown = sorted(c for c in present if c not in folds)
    if out_of_fold:
        written_by = ", ".join(str(f) for f in sorted({folds[c]["fold"] for c in out_of_fold}, key=str))

        def what(verb):
            return (f"stage 1 fold all's final validation {verb} the OUT-OF-FOLD predictions of {len(out_of_fold)} "
                    f"case(s) in {folder} (written by fold(s) {written_by}) with in-sample ones: fold all predicts "
                    f"its own training cases, so stage 2 trained from this folder afterwards learns from nearly "
                    f"perfect prompts and sees worse ones at test time")
        if environ.get(OVERWRITE_OOF_PROMPTS_VARIABLE) == "1":
            return f"WARNING: {OVERWRITE_OOF_PROMPTS_VARIABLE}=1: " + what("overwrites")
        raise OutOfFoldPromptsWouldBeOverwritten(
            "REFUSED: " + what("would overwrite") + f". To keep them for stage 2, train fold all under another "
            f"nnUNet_results (or move this folder aside and back afterwards). To replace them, set "
            f"{OVERWRITE_OOF_PROMPTS_VARIABLE}=1 and rerun the same command (add --val to run only the final "
            f"validation of a finished training).")
    if unknown:
        return (f"WARNING: stage 1 fold all's final validation overwrites {len(unknown)} prediction(s) in {folder} "
                f"that {PROMPT_FOLDS_MANIFEST} does not list (origin unknown: they may be out of fold) with in-sample "
                f"ones")
    return None


def summarize_prompt_origin(folder: str, cases) -> dict[str, list[str]]:
    """The cases' prompts in `folder`, by origin: "out_of_fold", "in_sample" and "unknown" (no manifest entry)."""
    folds = read_prompt_folds(folder) or {}
    origin = {"out_of_fold": [], "in_sample": [], "unknown": []}
    for case in sorted(cases):
        entry = folds.get(case)
        origin["unknown" if entry is None else "out_of_fold" if entry["out_of_fold"] else "in_sample"].append(case)
    return origin


def describe_prompt_origin(folder: str, cases) -> str:
    """One line: are these cases' stage-1 prompts out of fold or in sample, according to the manifest?"""
    origin = summarize_prompt_origin(folder, cases)
    total = sum(len(v) for v in origin.values())
    count = {key: f"all {total}" if len(value) == total else f"{len(value)} of {total}"
             for key, value in origin.items()}
    parts = []
    if origin["in_sample"]:
        parts.append(f"IN-SAMPLE for {count['in_sample']} cases ({IN_SAMPLE_EXPLANATION})")
    if origin["out_of_fold"]:
        folds = read_prompt_folds(folder)
        written_by = ", ".join(str(f) for f in sorted({folds[c]["fold"] for c in origin["out_of_fold"]}, key=str))
        parts.append(f"out-of-fold for {count['out_of_fold']} cases (stage-1 folds {written_by})")
    if origin["unknown"]:
        parts.append(f"origin unknown for {count['unknown']} cases "
                     f"(not listed in {join(folder, PROMPT_FOLDS_MANIFEST)})")
    return "; ".join(parts) or "no cases"
