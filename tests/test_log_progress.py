"""The held-out evaluation's terminal progress, read from the logs of real nnU-Net commands."""
from __future__ import annotations

import re
import sys

from nnunetv2_rfmedsam.holdout import run_logged
from nnunetv2_rfmedsam.log_progress import LogProgress


def shown(progress: LogProgress, text: str) -> list[str]:
    return [line for raw in text.splitlines() for line in progress.feed(raw)]


def test_stage1_training_shows_each_epoch_and_its_final_validation(stage1_workspace):
    """The workspace's stage 1, resumed with --c for its second and last epoch, then its final validation."""
    output = stage1_workspace["stage1_resumed_output"]
    lines = shown(LogProgress("stage 1"), output)
    epochs = [line for line in lines if " epoch " in line]
    assert len(epochs) == 1 and epochs[0].startswith("  stage 1: epoch 2/2, train loss ")
    dice = re.findall(r"Pseudo dice \[(.*)\]", output)[-1]
    expected = " / ".join(f"{float(v):.2f}" for v in re.findall(r"np\.float32\(([-\d.e]+)\)", dice))
    assert f"pseudo-Dice {expected}," in epochs[0]
    assert epochs[0].endswith("about 0 s left in training")
    validated = len(re.findall(r": predicting \S+\s*$", output, flags=re.M))
    mean = float(re.search(r"Mean Validation Dice:\s+(\S+)", output).group(1))
    assert lines[-1] == f"  stage 1: final validation of {validated} cases, mean Dice {mean:.3f}"


def test_time_left_follows_the_recent_epochs():
    progress = LogProgress("x", epochs=10)
    log = "".join(f"t: Epoch {e}\nt: train_loss -0.5\nt: Pseudo dice [np.float32(0.5)]\nt: Epoch time: 30.0 s\n"
                  for e in range(4))
    assert shown(progress, log)[-1].endswith("30 s/epoch, about 3.0 min left in training")  # 6 epochs x 30 s


def test_run_logged_prints_progress_and_keeps_the_whole_log(tmp_path, capsys):
    script = ("import sys\nprint('There are 2 cases that I would like to predict')\n"
              "for case in ('a', 'b'):\n    print('Predicting', case + ':')\n    print('done with', case)\n")
    log = tmp_path / "predict.log"
    run_logged([sys.executable, "-c", script], {}, log, "stage 1 predicts")
    out = capsys.readouterr().out
    assert "  stage 1 predicts: predicted a (1/2)\n  stage 1 predicts: predicted b (2/2)\n" in out
    assert log.read_text().count("done with") == 2
