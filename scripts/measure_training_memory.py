"""Measure the activation coefficients of planners/training_memory.py and print them, with the fit's errors.

For each SAM 2 model size, counts the bytes one CPU training step saves for backward (float32,
`measure_saved_activation_bytes`) at small inputs whose terms differ (input sizes with and without Hiera's window
padding, 1 to 9 slices, 1 to 4 classes, one or two passes, small and large patch grids), fits the coefficients by
non-negative least squares on the relative error, and prints them as `MODEL_MEMORY` entries with the parameter
counts. `--check 1024` then measures one step at that input size and compares it with the fit's estimate: the
extrapolation the planner relies on.

    OMP_NUM_THREADS=1 python scripts/measure_training_memory.py --sizes tiny --check 1024

Run one model size per process: the process's memory grows over the measurements (large ran out of 14 GB).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import fields

import numpy as np
import torch
from scipy.optimize import nnls

from nnunetv2_rfmedsam.planners.training_memory import (GIB, ActivationCoefficients, activation_bytes,
                                                        activation_terms, measure_saved_activation_bytes)
from nnunetv2_rfmedsam.settings import SAM2Settings

# (image size, batch, slices, classes, passes, patch grid): every term varies independently of the others
FIT_POINTS = [
    (128, 1, 2, 1, 2, (64, 64)),
    (128, 2, 3, 2, 2, (32, 48)),
    (128, 1, 6, 1, 2, (32, 32)),
    (128, 1, 9, 2, 2, (32, 32)),     # beyond num_maskmem: the later slices read 7 memories each
    (128, 1, 2, 4, 2, (128, 128)),
    (192, 1, 4, 1, 2, (96, 96)),
    (192, 1, 2, 3, 1, (48, 48)),
    (224, 1, 3, 2, 2, (112, 112)),   # 224: no window padding
    (224, 2, 2, 1, 1, (56, 56)),
    (224, 1, 2, 1, 2, (224, 224)),
    (256, 1, 2, 2, 2, (64, 64)),
    (256, 1, 3, 1, 1, (128, 128)),
]


def measure(model_size: str, point) -> tuple[dict, int]:
    image_size, batch, slices, classes, passes, grid = point
    settings = SAM2Settings(model_size=model_size, image_size=image_size, slices_per_patch=slices,
                            refinement_passes=passes)
    terms = activation_terms(settings, batch, classes, grid)
    return terms, measure_saved_activation_bytes(settings, batch, classes, grid)


def fit(model_size: str) -> ActivationCoefficients:
    names = [f.name for f in fields(ActivationCoefficients)]
    rows, measured = [], []
    for point in FIT_POINTS:
        start = time.time()
        terms, saved = measure(model_size, point)
        rows.append([terms[name] for name in names])
        measured.append(saved)
        print(f"  {point}: {saved / 2 ** 20:.1f} MiB ({time.time() - start:.1f} s)", flush=True)
    a, b = np.array(rows, dtype=float), np.array(measured, dtype=float)
    # relative error: each point weighs the same whatever its size; columns scaled for the solver
    scale = a.max(axis=0)
    scale[scale == 0] = 1
    solution, _ = nnls(a / b[:, None] / scale, np.ones(len(b)))
    coefficients = ActivationCoefficients(*(solution / scale))
    for point, saved in zip(FIT_POINTS, measured):
        estimate = activation_bytes(coefficients, activation_terms(
            SAM2Settings(model_size=model_size, image_size=point[0], slices_per_patch=point[2],
                         refinement_passes=point[4]), point[1], point[3], point[5]))
        print(f"  fit {point}: {estimate / saved - 1:+.1%}")
    return coefficients


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny"])
    parser.add_argument("--check", type=int, default=None, help="measure one step at this input size (1024: ~6 GB)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model_size in args.sizes:
        print(f"{model_size}:")
        from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
        trainable, total = RFMedSAM2Network(2, 2, model_size=model_size, image_size=128).parameter_counts()
        coefficients = fit(model_size)
        values = ", ".join(f"{f.name}={getattr(coefficients, f.name):.4g}" for f in fields(coefficients))
        print(f'    "{model_size}": ModelMemory(parameters={total}, trainable={trainable}, '
              f'activations=ActivationCoefficients({values}), source="measured"),')
        if args.check:
            point = (args.check, 1, 2, 1, 2, (args.check // 2, args.check // 2))
            terms, saved = measure(model_size, point)
            estimate = activation_bytes(coefficients, terms)
            print(f"  check {point}: measured {saved / GIB:.2f} GiB, estimated {estimate / GIB:.2f} GiB "
                  f"({estimate / saved - 1:+.1%})")


if __name__ == "__main__":
    main()
