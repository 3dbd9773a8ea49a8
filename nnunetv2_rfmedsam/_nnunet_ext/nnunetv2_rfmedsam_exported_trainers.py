# Imported by nnU-Net's external-trainer search (see nnunetv2_rfmedsam/registration.py).
# Re-exports only: the classes stay importable (and picklable) under nnunetv2_rfmedsam.trainers.
from nnunetv2_rfmedsam.trainers import *  # noqa: F401,F403
