"""Building nnU-Net raw datasets from a subset of another one (demo, tests, held-out evaluation)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# the project's real data lives in ../shared/data beside the repository; a plain clone has the vendored subset
SHARED_HIPPOCAMPUS = REPO_ROOT.parent / "shared" / "data" / "Dataset004_Hippocampus"
VENDORED_HIPPOCAMPUS = REPO_ROOT / "data" / "Dataset004_Hippocampus_subset"
# one abdominal CT with pseudo labels; the vendored crop (scripts/make_ct_crop.py) holds every labelled organ whole
SHARED_ABDOMEN_CT = REPO_ROOT.parent / "shared" / "data" / "AbdomenCT_example"
VENDORED_ABDOMEN_CT = REPO_ROOT / "data" / "AbdomenCT_crop"
ABDOMEN_CT_FILES = ("ct.nii.gz", "labels_btcv13_pseudo.nii.gz")


def hippocampus_source() -> Path:
    """The hippocampus data to use: $RFMEDSAM2_HIPPOCAMPUS, ../shared/data, or the vendored subset."""
    for candidate in (os.environ.get("RFMEDSAM2_HIPPOCAMPUS"), SHARED_HIPPOCAMPUS, VENDORED_HIPPOCAMPUS):
        if candidate and (Path(candidate) / "dataset.json").is_file():
            return Path(candidate)
    raise FileNotFoundError(f"no hippocampus data: neither {SHARED_HIPPOCAMPUS} nor {VENDORED_HIPPOCAMPUS} exists")


def abdomen_ct_source() -> Path:
    """The folder of the abdominal CT and its labels (ABDOMEN_CT_FILES): $RFMEDSAM2_ABDOMEN_CT, ../shared/data,
    or the vendored crop."""
    for candidate in (os.environ.get("RFMEDSAM2_ABDOMEN_CT"), SHARED_ABDOMEN_CT, VENDORED_ABDOMEN_CT):
        if candidate and all((Path(candidate) / name).is_file() for name in ABDOMEN_CT_FILES):
            return Path(candidate)
    raise FileNotFoundError(f"no abdominal CT: neither {SHARED_ABDOMEN_CT} nor {VENDORED_ABDOMEN_CT} exists")


def list_cases(dataset_dir: Path) -> list[str]:
    """Case identifiers of a raw dataset, from its labelsTr folder, sorted."""
    file_ending = json.loads((Path(dataset_dir) / "dataset.json").read_text())["file_ending"]
    return sorted(p.name[: -len(file_ending)] for p in (Path(dataset_dir) / "labelsTr").iterdir()
                  if p.name.endswith(file_ending))


def split_holdout(cases: list[str], num_train: int, num_test: int) -> tuple[list[str], list[str]]:
    """Every other case goes to the test set until it is full, so both sets span the whole list."""
    if num_train + num_test > len(cases):
        raise ValueError(f"asked for {num_train} training and {num_test} test cases, but only {len(cases)} exist")
    step = max(1, len(cases) // max(1, num_test))
    test = cases[step // 2::step][:num_test]
    train = [c for c in cases if c not in test][:num_train]
    return train, test


def write_raw_dataset(source_dir: Path, target_dir: Path, train_cases: list[str],
                      test_cases: list[str] = ()) -> Path:
    """Copy cases of `source_dir` into a new nnU-Net raw dataset: training cases into imagesTr/labelsTr,
    held-out cases into imagesTs/labelsTs; dataset.json gets the right numTraining."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    dataset_json = json.loads((source_dir / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    channels = sorted(int(c) for c in dataset_json["channel_names"])
    for cases, images, labels in ((train_cases, "imagesTr", "labelsTr"), (test_cases, "imagesTs", "labelsTs")):
        if not cases:
            continue
        (target_dir / images).mkdir(parents=True, exist_ok=True)
        (target_dir / labels).mkdir(parents=True, exist_ok=True)
        for case in cases:
            for channel in channels:
                name = f"{case}_{channel:04d}{ending}"
                shutil.copyfile(source_dir / "imagesTr" / name, target_dir / images / name)
            shutil.copyfile(source_dir / "labelsTr" / f"{case}{ending}", target_dir / labels / f"{case}{ending}")
    dataset_json["numTraining"] = len(train_cases)
    (target_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    return target_dir
