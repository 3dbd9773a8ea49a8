"""The metrics of one case (`evaluate_case`), after checking its labels and geometry, and a runner that applies such
a per-case function to every case, in this process or in worker processes (`run_over_cases`).

The metrics and their conventions (empty masks, NSD tolerance, HD95 definition) are those of
`nnunetv2_rfmedsam.evaluation.metrics`. A prediction whose geometry (size, spacing, origin, direction; floats within
a relative 1e-4) differs from its ground truth, or a label id outside the evaluated labels, is refused.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, TypeVar

from tqdm import tqdm

from nnunetv2_rfmedsam.evaluation.case_files import CompareError, check_label_ids, read_label_map
from nnunetv2_rfmedsam.evaluation.metrics import case_metrics

# the metrics of each record, in the order of the outputs' columns
METRICS = ("dice", "nsd", "hd95")

_Task = TypeVar("_Task")
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class CaseTask:
    """One case: its ground truth and the prediction of every method that has one."""
    case: str
    ground_truth: str
    predictions: dict[str, str]
    labels: tuple[int, ...]
    labels_origin: str
    tolerance_mm: float


def evaluate_case(task: CaseTask) -> list[dict]:
    """Per-class metric records of every method for one case, after checking labels and geometry."""
    reference, reference_geometry = read_label_map(task.ground_truth)
    check_label_ids(reference, task.ground_truth, task.labels, task.labels_origin)
    # SimpleITK's spacing is x, y, z; the arrays are z, y, x
    spacing = reference_geometry.spacing[::-1]
    records = []
    for method, path in task.predictions.items():
        prediction, geometry = read_label_map(path)
        difference = geometry.difference(reference_geometry)
        if difference is not None:
            raise CompareError(f"case {task.case}, method {method}: the prediction's geometry differs from the "
                               f"ground truth's: {difference} ({path} vs {task.ground_truth})")
        check_label_ids(prediction, path, task.labels, task.labels_origin)
        for label, metrics in case_metrics(reference, prediction, task.labels, spacing, task.tolerance_mm).items():
            records.append({"method": method, "case": task.case, "label": str(label),
                            "dice": metrics.dice, "nsd": metrics.nsd, "hd95": metrics.hd95})
    return records


def run_over_cases(function: Callable[[_Task], _Result], tasks: list[_Task], num_processes: int,
                   description: str) -> list[_Result]:
    """`function` over `tasks` with a progress bar, in worker processes when num_processes > 1; results in
    task order. The first error stops the run."""
    if num_processes == 1 or len(tasks) <= 1:
        # the context manager closes the bar before an error propagates, so the bar does not print after it
        with tqdm(total=len(tasks), desc=description, unit="case") as progress:
            results = []
            for task in tasks:
                results.append(function(task))
                progress.update()
            return results
    # spawn, as nnU-Net does: forking a caller that already runs threads (torch, a GUI) can deadlock
    with ProcessPoolExecutor(max_workers=min(num_processes, len(tasks)),
                             mp_context=multiprocessing.get_context("spawn")) as executor:
        futures = [executor.submit(function, task) for task in tasks]
        with tqdm(total=len(tasks), desc=description, unit="case") as progress:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                progress.update(len(done))
                for future in done:
                    if future.exception() is not None:
                        executor.shutdown(cancel_futures=True)
                        raise future.exception()
        return [future.result() for future in futures]
