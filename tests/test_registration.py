"""The stock nnU-Net lookup finds the plugin's trainers, in the main process and in spawned workers."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

from conftest import bin_command, run_command
from nnunetv2_rfmedsam.registration import EXT_TRAINER_FOLDER

LOOKUP_IN_SPAWNED_WORKER = r"""
import multiprocessing, pickle

def find(name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    cls = recursive_find_trainer_class_by_name(name)
    return pickle.dumps(cls), cls.__module__

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        for name in ("nnUNetTrainerRFPrompt",):
            blob, module = pool.apply(find, (name,))
            # the class travels back through pickle: it must resolve to the installed package
            cls = pickle.loads(blob)
            print(name, module, cls.__name__)
"""


def test_ext_path_names_a_folder_with_one_reexport_module():
    proc = subprocess.run([bin_command("nnUNetv2_rfmedsam_ext_path")], capture_output=True, text=True,
                          env=dict(os.environ, nnUNet_extTrainer=""))
    assert proc.stdout.strip() == EXT_TRAINER_FOLDER
    modules = [p.name for p in Path(EXT_TRAINER_FOLDER).glob("*.py")]
    assert modules == ["nnunetv2_rfmedsam_exported_trainers.py"]


def test_ext_path_keeps_other_external_trainer_folders(tmp_path):
    proc = subprocess.run([bin_command("nnUNetv2_rfmedsam_ext_path")], capture_output=True, text=True,
                          env=dict(os.environ, nnUNet_extTrainer=str(tmp_path)))
    assert proc.stdout.strip().split(os.pathsep) == [EXT_TRAINER_FOLDER, str(tmp_path)]


def test_trainer_lookup_from_a_spawned_process(tmp_path):
    env = dict(os.environ, nnUNet_extTrainer=EXT_TRAINER_FOLDER)
    script = tmp_path / "lookup.py"
    script.write_text(LOOKUP_IN_SPAWNED_WORKER)
    proc = run_command([sys.executable, str(script)], env)
    assert "nnUNetTrainerRFPrompt nnunetv2_rfmedsam.trainers.prompt_trainer nnUNetTrainerRFPrompt" in proc.stdout


def test_trainers_pickle_by_reference():
    from nnunetv2_rfmedsam.trainers import nnUNetTrainerRFPrompt
    assert pickle.loads(pickle.dumps(nnUNetTrainerRFPrompt)) is nnUNetTrainerRFPrompt
