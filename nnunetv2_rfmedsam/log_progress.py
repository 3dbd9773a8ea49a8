"""What a stock nnU-Net command is doing, read from its log while it runs: one terminal line per epoch (loss,
pseudo-Dice, time left) and per predicted case.

nnU-Net prints an epoch's train loss, pseudo-Dice and duration to its output and its training log; the held-out
evaluation sends each command's output to a log file, so that the terminal keeps one line per step instead of
nnU-Net's banners and warnings. `LogProgress.feed` takes the log's new lines and returns the lines to show.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

NNUNET_DEFAULT_EPOCHS = 1000  # nnUNetTrainer.num_epochs
EPOCH = re.compile(r": Epoch (\d+)\s*$")
TRAIN_LOSS = re.compile(r"train_loss (\S+)")
PSEUDO_DICE = re.compile(r"Pseudo dice \[(.*)\]")
EPOCH_TIME = re.compile(r"Epoch time: ([\d.]+) s")
BUDGET_EPOCHS = re.compile(r"num_epochs = (\d+)")
VALIDATION_CASE = re.compile(r": predicting (\S+)\s*$")
MEAN_VALIDATION_DICE = re.compile(r"Mean Validation Dice:\s+(\S+)")
CASES_TO_PREDICT = re.compile(r"There are (\d+) cases that I would like to predict")
DONE_WITH = re.compile(r"^done with (\S+)")


def _numbers(text: str) -> list[float]:
    """`np.float32(0.45), np.float32(0.0)` (numpy 2) or `0.45, 0.0` -> [0.45, 0.0]."""
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", re.sub(r"np\.\w+\(", "", text))]


@dataclass
class LogProgress:
    """Progress lines of one command. `epochs`: the training's epochs when known (a budget); otherwise the budget
    line the plugin's trainers log, else nnU-Net's default."""

    label: str
    epochs: int | None = None
    _epoch: int | None = None
    _loss: str = ""
    _dice: list = field(default_factory=list)
    _epoch_seconds: list = field(default_factory=list)
    _validated: int = 0
    _to_predict: int | None = None
    _predicted: int = 0

    def feed(self, line: str) -> list[str]:
        line = line.rstrip("\n")
        if (match := BUDGET_EPOCHS.search(line)) and self.epochs is None:
            self.epochs = int(match.group(1))
        elif match := EPOCH.search(line):
            self._epoch, self._loss, self._dice = int(match.group(1)), "", []
        elif match := TRAIN_LOSS.search(line):
            self._loss = match.group(1)
        elif match := PSEUDO_DICE.search(line):
            self._dice = _numbers(match.group(1))
        elif (match := EPOCH_TIME.search(line)) and self._epoch is not None:
            self._epoch_seconds.append(float(match.group(1)))
            return [self._epoch_line()]
        elif VALIDATION_CASE.search(line):
            self._validated += 1
            if self._validated == 1:
                return [f"  {self.label}: final validation (nnU-Net predicts the validation cases)"]
        elif match := MEAN_VALIDATION_DICE.search(line):
            return [f"  {self.label}: final validation of {self._validated} cases, mean Dice {float(match.group(1)):.3f}"]
        elif match := CASES_TO_PREDICT.search(line):
            self._to_predict = int(match.group(1))
        elif match := DONE_WITH.search(line):
            self._predicted += 1
            total = f"/{self._to_predict}" if self._to_predict else ""
            return [f"  {self.label}: predicted {match.group(1)} ({self._predicted}{total})"]
        return []

    def _epoch_line(self) -> str:
        epochs = self.epochs or NNUNET_DEFAULT_EPOCHS
        done = self._epoch + 1
        recent = self._epoch_seconds[-5:]
        left = max(epochs - done, 0) * sum(recent) / len(recent)
        dice = " / ".join(f"{d:.2f}" for d in self._dice) or "n/a"
        return (f"  {self.label}: epoch {done}/{epochs}, train loss {self._loss or 'n/a'}, pseudo-Dice {dice}, "
                f"{self._epoch_seconds[-1]:.0f} s/epoch, about {_minutes(left)} left in training")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
