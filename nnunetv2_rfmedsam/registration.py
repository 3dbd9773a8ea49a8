"""Registration with nnU-Net's external-trainer lookup (``nnUNet_extTrainer``).

nnU-Net imports every module of an external trainer folder as a top-level module and removes them
from ``sys.modules`` afterwards, so classes *defined* there cannot be pickled into spawned workers.
The folder we hand out therefore holds a single, uniquely named module that only re-exports the
trainers from this installed package: the classes nnU-Net finds live in ``nnunetv2_rfmedsam.*``.
"""
import os

EXT_TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_nnunet_ext")


def print_ext_trainer_path() -> None:
    """Console script ``nnUNetv2_rfmedsam_ext_path``: ``export nnUNet_extTrainer=$(nnUNetv2_rfmedsam_ext_path)``."""
    existing = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    paths = [EXT_TRAINER_FOLDER] + [p for p in existing if os.path.abspath(p) != EXT_TRAINER_FOLDER]
    print(os.pathsep.join(paths))
