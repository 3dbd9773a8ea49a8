"""Shared fixtures: an nnU-Net workspace on real hippocampus cases, planned once, stage 1 and stage 2 trained once,
stage 1's predictions of the held-out cases written once.

The end-to-end tests run the stock nnU-Net commands as subprocesses with an environment of their own (nnU-Net's
folders come from environment variables); tests that build a trainer or call a command's entry point in this
process set those variables with monkeypatch (nnU-Net 2.8 reads them when it uses them).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: `make test` runs two pytest workers, and nnU-Net's commands set as many torch threads
# as the machine has cores. Spinning OpenMP threads of two processes on two cores made each ~1.6x slower than
# sharing the cores; waiting passively, two processes together take the time of both run one after the other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from nnunetv2_rfmedsam.model.sam2_checkpoint import save_official_format_checkpoint
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases, split_holdout, write_raw_dataset

DATASET_ID = 4
DATASET_NAME = "Dataset004_Hippocampus"
PLANS = "nnUNetRFMedSAM2Plans"
# tiny budgets: the tests check that the commands work together, not that the networks are good
TEST_SAM2_IMAGE_SIZE = 64
# Augmentation in the training process: a worker process would import torch and nnU-Net (~9 s of CPU) for the
# two or three batches of these budgets. Training only: nnU-Net's planning calls torch.set_num_threads(0) with 0.
IN_PROCESS_AUGMENTATION = {"nnUNet_n_proc_DA": "0"}
STAGE1_BUDGET = {"RFMEDSAM2_NUM_EPOCHS": "1", "RFMEDSAM2_ITERS_PER_EPOCH": "2", "RFMEDSAM2_VAL_ITERS": "1",
                 **IN_PROCESS_AUGMENTATION}
STAGE2_BUDGET = {"RFMEDSAM2_NUM_EPOCHS": "1", "RFMEDSAM2_ITERS_PER_EPOCH": "1", "RFMEDSAM2_VAL_ITERS": "1",
                 **IN_PROCESS_AUGMENTATION}
STAGE1_FOLDER = f"nnUNetTrainerRFPrompt__{PLANS}__3d_fullres"
STAGE2_FOLDER = f"nnUNetTrainerRFMedSAM2__{PLANS}__3d_rfmedsam2"
# stage 2 trains fold 0 of a split with 1 validation case: the final validation of fold `all` would run
# SAM 2 over every training case
STAGE2_FOLD = "0"


def run_command(command: list[str], env: dict, expect_success: bool = True, timeout: int = 1200):
    """Run a console command; on an unexpected result, fail with the end of its output."""
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_success and proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def assert_same_geometry(image_file: Path, prediction_file: Path) -> None:
    """A prediction has its input image's size, spacing, origin and direction, and only known labels."""
    import numpy as np
    import SimpleITK as sitk
    image, prediction = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(prediction_file))
    assert prediction.GetSize() == image.GetSize()
    assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
    assert np.allclose(prediction.GetOrigin(), image.GetOrigin())
    assert np.allclose(prediction.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}


def bin_command(name: str) -> str:
    """A console script of this environment (the tests may run under a python that is not first on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@pytest.fixture(scope="module")
def one_torch_thread():
    """SAM 2 in this process with one torch thread: on two shared cores, two OpenMP threads competing with
    other processes ran it about 20 times slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hippocampus_cases():
    source = hippocampus_source()
    train, test = split_holdout(list_cases(source), num_train=6, num_test=3)
    return source, train, test


@pytest.fixture(scope="session")
def nnunet_workspace(tmp_path_factory, hippocampus_cases):
    """Raw dataset (6 training, 3 held-out cases) and an environment pointing nnU-Net at it.

    Six training cases: enough for nnU-Net's five folds and for stage 2's split (5 training, 1 validation); each
    further case costs every stage-1 final validation of this workspace another mirrored prediction."""
    source, train, test = hippocampus_cases
    root = tmp_path_factory.mktemp("nnunet")
    raw = write_raw_dataset(source, root / "raw" / DATASET_NAME, train, test)
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f",
        # nnU-Net's export pools default to 8 processes, each importing torch and nnU-Net: the few cases of these
        # tests are exported by one
        "nnUNet_def_n_proc": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    ext = run_command([bin_command("nnUNetv2_rfmedsam_ext_path")], env).stdout.strip()
    env["nnUNet_extTrainer"] = ext
    return {"root": root, "raw": raw, "env": env, "train": train, "test": test}


@pytest.fixture(scope="session")
def planned_workspace(nnunet_workspace):
    run_command([bin_command("nnUNetv2_rfmedsam_plan_and_preprocess"), "-d", str(DATASET_ID),
                 "-c", "3d_fullres", "3d_rfmedsam2", "-np", "1", "-npfp", "1", "--no_pbar",
                 "--sam2-image-size", str(TEST_SAM2_IMAGE_SIZE)], nnunet_workspace["env"])
    return nnunet_workspace


@pytest.fixture(scope="session")
def stage1_workspace(planned_workspace):
    """Stage 1 trained on fold `all` with a tiny budget, killed in the middle of its second (last) epoch and resumed
    with `--c`; its final validation wrote predicted_next_stage."""
    env = dict(planned_workspace["env"], **{**STAGE1_BUDGET, "RFMEDSAM2_NUM_EPOCHS": "2"})
    command = [bin_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-p", PLANS,
               "-tr", "nnUNetTrainerRFPrompt", "-device", "cpu"]
    fold = planned_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "fold_all"
    kill_when_logged(command, env, fold, "Epoch 1")
    planned_workspace["stage1_resumed_output"] = run_command(command + ["--c"], env).stdout
    return planned_workspace


@pytest.fixture(scope="session")
def stage1_test_predictions(stage1_workspace, tmp_path_factory):
    """Stage 1's predictions of the held-out cases by the stock `nnUNetv2_predict`, without test-time mirroring
    (its eight mirrored runs per case are stage 1's business, and the tests that use these predictions check
    geometry, nnU-Net's Dice and what the cascade makes of them)."""
    out = tmp_path_factory.mktemp("stage1_predictions")
    raw = stage1_workspace["raw"]
    run_command([bin_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                 "-c", "3d_fullres", "-p", PLANS, "-tr", "nnUNetTrainerRFPrompt", "-f", "all", "-device", "cpu",
                 "-npp", "1", "-nps", "1", "--disable_tta"], stage1_workspace["env"])
    return out


def stage2_trainer(preprocessed: Path, fold: int):
    """nnUNetTrainerRFMedSAM2 built in this process as `nnUNetv2_train` builds it (get_trainer_from_args: plans and
    dataset.json of the preprocessed folder; nnU-Net 2.8 passes --c in the plans and the trainer pops it). nnU-Net's
    folders must be in the environment."""
    import torch
    from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2
    plans = json.loads((Path(preprocessed) / f"{PLANS}.json").read_text())
    dataset_json = json.loads((Path(preprocessed) / "dataset.json").read_text())
    return nnUNetTrainerRFMedSAM2(dict(plans, continue_training=False), "3d_rfmedsam2", fold, dataset_json,
                                  torch.device("cpu"))


def stage2_fold_folder(workspace) -> Path:
    return workspace["root"] / "results" / DATASET_NAME / STAGE2_FOLDER / f"fold_{STAGE2_FOLD}"


def train_stage2(workspace, extra_env, expect_success=True, extra_args=(), interrupt_in_epoch=None):
    """nnUNetv2_train of stage 2 on fold STAGE2_FOLD (5 training cases, 1 validation case). With
    `interrupt_in_epoch=E` the run is killed (SIGKILL) as soon as its log says epoch E has begun."""
    train = workspace["train"]
    split = [{"train": train[1:], "val": train[:1]}]
    (workspace["root"] / "preprocessed" / DATASET_NAME / "splits_final.json").write_text(json.dumps(split))
    env = dict(workspace["env"], **{**STAGE2_BUDGET, **extra_env})
    command = [bin_command("nnUNetv2_train"), str(DATASET_ID), "3d_rfmedsam2", STAGE2_FOLD, "-p", PLANS,
               "-tr", "nnUNetTrainerRFMedSAM2", "-device", "cpu", *extra_args]
    if interrupt_in_epoch is None:
        return run_command(command, env, expect_success=expect_success)
    return kill_when_logged(command, env, stage2_fold_folder(workspace), f"Epoch {interrupt_in_epoch}")


def kill_when_logged(command: list[str], env: dict, fold_folder: Path, line: str, timeout: float = 900) -> str:
    """Start a training command and kill it as soon as a new training log in `fold_folder` has a line ending in
    `line`; return that log. Fails if the run ends first."""
    before = set(fold_folder.glob("training_log*.txt"))
    pattern = re.compile(rf": {re.escape(line)}\s*$", re.MULTILINE)
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            logs = [p.read_text() for p in set(fold_folder.glob("training_log*.txt")) - before]
            if any(pattern.search(log) for log in logs):
                proc.kill()
                proc.wait()
                return "".join(logs)
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        output.seek(0)
        pytest.fail(f"{' '.join(command)} ended or timed out before its log said {line!r}; output:\n"
                    f"{output.read()[-4000:]}")


def write_gated_checkpoint(source: Path, target: Path, gate: float) -> Path:
    """A copy of the nnU-Net checkpoint `source` with every prompt gate set to `gate` (clamped into GATE_RANGE:
    0 gives the gates' start, stage 1's label map; 1 gives SAM 2's logits)."""
    import torch
    from nnunetv2_rfmedsam.model.network import PROMPT_GATE_LOGITS, gate_logits
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    logits = checkpoint["network_weights"][PROMPT_GATE_LOGITS]
    checkpoint["network_weights"][PROMPT_GATE_LOGITS] = gate_logits(torch.full_like(logits, gate))
    torch.save(checkpoint, target)
    return target


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A SAM 2.1 tiny checkpoint in the official format ({"model": state_dict}), randomly initialised."""
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    save_official_format_checkpoint(path, "tiny")
    return path


@pytest.fixture(scope="session")
def stage2_workspace(stage1_workspace, tiny_checkpoint):
    """Stage 2 trained on fold STAGE2_FOLD with a tiny budget, from the tiny official-format checkpoint, the way
    long runs on shared machines go: killed in the middle of its second (last) epoch, then resumed with `--c`."""
    sam2 = {"RFMEDSAM2_SAM2_CHECKPOINT": str(tiny_checkpoint), "RFMEDSAM2_NUM_EPOCHS": "2"}
    # the interrupted run's training log: what stage 2 says when a training starts
    stage1_workspace["stage2_log"] = train_stage2(stage1_workspace, sam2, interrupt_in_epoch=1)
    stage1_workspace["stage2_resumed_output"] = train_stage2(stage1_workspace, sam2, extra_args=["--c"]).stdout
    return stage1_workspace


WORKSPACE_FIXTURES = {"stage1_workspace", "stage2_workspace", "stage1_test_predictions"}
# runs longest of the tests outside the workspace group: a worker should start it first, not last
LONGEST_OUTSIDE_WORKSPACE = "test_holdout.py"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the xdist_group marks into scopes
def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (what `make test` runs).

    Every test of the trained workspace runs on one worker, which trains stage 1 and stage 2 once; every other
    test module is a group of its own, so module fixtures are built once. The workspace group goes first and the
    held-out workflow second, so that the two longest runs start together. Without xdist the marks do nothing and
    the order is the same as by file, apart from those two coming first."""
    def group(item):
        if WORKSPACE_FIXTURES & set(getattr(item, "fixturenames", ())):
            return "workspace"
        return item.path.name

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {"workspace": 0, LONGEST_OUTSIDE_WORKSPACE: 1}
    items.sort(key=lambda item: rank.get(group(item), 2))  # stable: the order within a group is kept
