"""The compare command: metric values with known answers, statistics, outputs, bad input, agreement with nnU-Net."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, binary_erosion
from scipy.stats import wilcoxon

from conftest import bin_command
from nnunetv2_rfmedsam.evaluation.case_figures import cases_to_show, most_different_slice
from nnunetv2_rfmedsam.evaluation.compare import CompareError, compare_folders
from nnunetv2_rfmedsam.evaluation.metrics import class_metrics
from nnunetv2_rfmedsam.evaluation.statistics import (bootstrap_ci, paired_comparison, summarize, wilcoxon_p,
                                                     wins_ties_losses)
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source

HIPPOCAMPUS = hippocampus_source()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def ball(shape: tuple[int, ...], radius: float) -> np.ndarray:
    centre = np.array(shape) / 2
    grid = np.indices(shape).reshape(len(shape), -1).T
    return (np.linalg.norm(grid - centre, axis=1) <= radius).reshape(shape)


def write_label_map(path: Path, array: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def box_case(shift: int = 0) -> np.ndarray:
    """Label 1 and label 2 as boxes; `shift` moves both along array axis 0."""
    array = np.zeros((12, 12, 12), dtype=np.uint8)
    array[2 + shift:6 + shift, 2:8, 2:8] = 1
    array[7:10, 3:9, 3:9] = 2
    return array


@pytest.fixture
def folders(tmp_path):
    """Three ground-truth cases; method 'shifted' moves label 1 by one voxel, 'exact' copies the truth."""
    paths = {name: tmp_path / name for name in ("gt", "shifted", "exact")}
    for path in paths.values():
        path.mkdir()
    for case in ("case_a", "case_b", "case_c"):
        write_label_map(paths["gt"] / f"{case}.nii.gz", box_case())
        shifted = box_case()
        shifted[shifted == 1] = 0
        shifted[box_case(shift=1) == 1] = 1
        write_label_map(paths["shifted"] / f"{case}.nii.gz", shifted)
        write_label_map(paths["exact"] / f"{case}.nii.gz", box_case())
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    paths["dataset_json"] = dataset_json
    paths["out"] = tmp_path / "out"
    return paths


def run_compare(folders, **kwargs) -> dict:
    preds = kwargs.pop("preds", {"shifted": str(folders["shifted"]), "exact": str(folders["exact"])})
    return compare_folders(str(folders["gt"]), preds, str(folders["out"]), **kwargs)


# --- metrics with known answers -------------------------------------------------------------------------------

def test_dice_of_nested_spheres_follows_from_voxel_counts():
    inner, outer = ball((40, 40, 40), 8), ball((40, 40, 40), 11)
    expected = 2 * inner.sum() / (inner.sum() + outer.sum())  # inner lies inside outer: the overlap is inner
    assert class_metrics(inner, outer, (1, 1, 1)).dice == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("gap", [2, 3, 4])
def test_concentric_spheres_are_their_radius_difference_apart(gap):
    inner, outer = ball((48, 48, 48), 10), ball((48, 48, 48), 10 + gap)
    metrics = class_metrics(inner, outer, (1, 1, 1), tolerance_mm=1.0)
    assert metrics.hd95 == pytest.approx(gap, abs=0.5)  # voxelised spheres: within half a voxel
    assert metrics.nsd == 0.0
    assert class_metrics(inner, outer, (1, 1, 1), tolerance_mm=gap + 1).nsd == 1.0


def test_shift_along_an_anisotropic_axis_is_measured_in_mm():
    reference = np.zeros((10, 10, 10), dtype=bool)
    reference[4, 2:8, 2:8] = True  # one voxel thick: every voxel is surface, every distance exact
    spacing = (3.0, 1.0, 1.0)
    along_coarse = class_metrics(reference, np.roll(reference, 1, axis=0), spacing, tolerance_mm=1.0)
    assert (along_coarse.dice, along_coarse.nsd, along_coarse.hd95) == (0.0, 0.0, 3.0)
    assert class_metrics(reference, np.roll(reference, 1, axis=0), spacing, tolerance_mm=3.0).nsd == 1.0
    along_fine = class_metrics(reference, np.roll(reference, 1, axis=1), spacing, tolerance_mm=1.0)
    assert along_fine.hd95 == 1.0 and along_fine.nsd == 1.0


def test_dice_of_a_box_shifted_by_one_slice():
    reference = np.zeros((12, 12, 12), dtype=bool)
    reference[2:6, 2:8, 2:8] = True  # 4 slices: a one-slice shift keeps 3 of them
    metrics = class_metrics(reference, np.roll(reference, 1, axis=0), (3.0, 1.0, 1.0))
    assert metrics.dice == pytest.approx(3 / 4)
    assert metrics.hd95 == 3.0


def test_empty_masks():
    empty, full = np.zeros((6, 6, 6), dtype=bool), ball((6, 6, 6), 2)
    both_empty = class_metrics(empty, empty, (1, 1, 1))
    assert (both_empty.dice, both_empty.nsd) == (1.0, 1.0) and math.isnan(both_empty.hd95)
    for reference, prediction in ((empty, full), (full, empty)):
        one_empty = class_metrics(reference, prediction, (1, 1, 1))
        assert (one_empty.dice, one_empty.nsd) == (0.0, 0.0) and math.isnan(one_empty.hd95)


# --- statistics --------------------------------------------------------------------------------------------------

def test_constant_improvement():
    comparison = paired_comparison([0.9] * 8, [0.8] * 8)
    assert comparison.mean_difference == pytest.approx(0.1)
    assert comparison.ci95 == pytest.approx((0.1, 0.1))
    assert (comparison.wins, comparison.ties, comparison.losses) == (8, 0, 0)
    assert comparison.wilcoxon_p == pytest.approx(2 / 2 ** 8)  # exact test: only all-positive is as extreme


def test_wilcoxon_matches_scipy_and_degenerate_cases():
    differences = [0.12, -0.03, 0.2, 0.07, -0.01, 0.15]
    assert wilcoxon_p(differences) == pytest.approx(wilcoxon(differences).pvalue)
    assert wilcoxon_p([0.0, 0.0, 1e-10]) == 1.0
    assert math.isnan(wilcoxon_p([0.3]))
    assert math.isnan(wilcoxon_p([]))


def test_wins_ties_losses_and_tie_tolerance():
    assert wins_ties_losses([0.1, -0.2, 0.0, 5e-9, -5e-9, 0.3]) == (2, 3, 1)


def test_bootstrap_is_reproducible_and_brackets_the_mean():
    differences = np.random.default_rng(1).normal(0.05, 0.1, size=30)
    low, high = bootstrap_ci(differences)
    assert (low, high) == bootstrap_ci(differences)
    assert low < differences.mean() < high
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_summaries_ignore_undefined_values():
    assert summarize([1.0, math.nan, 3.0]) == {"mean": 2.0, "std": 1.0, "median": 2.0}
    assert all(math.isnan(v) for v in summarize([math.nan]).values())


# --- outputs -------------------------------------------------------------------------------------------------------

def test_metrics_json_schema(folders):
    returned = run_compare(folders, labels_json=str(folders["dataset_json"]))
    text = (folders["out"] / "metrics.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert result == returned
    assert set(result) >= {"methods", "paired", "cases", "settings", "missing"}
    assert list(result["methods"]) == ["shifted", "exact"]
    for summary in result["methods"].values():
        assert list(summary["per_class"]) == ["1", "2"]
        for per_class in summary["per_class"].values():
            for metric in ("dice", "nsd", "hd95"):
                assert set(per_class[metric]) == {"mean", "std", "median"}
            assert per_class["hd95_undefined"] == 0
        assert set(summary["foreground_mean"]) == {"dice", "nsd", "hd95"}
    assert list(result["paired"]) == ["exact"]
    improvement = result["paired"]["exact"]["1"]
    assert set(improvement) >= {"dice_diff_mean", "ci95", "wilcoxon_p", "wins", "ties", "losses"}
    assert improvement["dice_diff_mean"] == pytest.approx(1 - 3 / 4)
    assert (improvement["wins"], improvement["ties"], improvement["losses"]) == (3, 0, 0)
    assert result["paired"]["exact"]["2"]["wilcoxon_p"] == 1.0  # label 2 identical in both methods
    # per case, the mean over both classes: label 1 gains 1/4, label 2 nothing
    overall = result["paired"]["exact"]["foreground_mean"]
    assert overall["dice_diff_mean"] == pytest.approx((1 - 3 / 4) / 2) and overall["wins"] == 3
    assert overall["ci95"][0] <= overall["dice_diff_mean"] <= overall["ci95"][1]
    assert result["methods"]["shifted"]["per_class"]["1"]["hd95"]["mean"] == 1.0
    assert len(result["cases"]) == 2 * 3 * 2
    assert set(result["cases"][0]) >= {"method", "case", "label", "dice", "nsd", "hd95"}
    assert result["settings"]["baseline"] == "shifted"
    assert result["settings"]["labels"] == {"1": "Anterior", "2": "Posterior"}
    assert result["missing"] == {"shifted": [], "exact": []}
    report = (folders["out"] / "report.md").read_text()
    assert "Anterior (1)" in report and "| exact |" in report
    assert len((folders["out"] / "cases.csv").read_text().splitlines()) == 1 + 12


def test_an_absent_class_scores_zero_and_counts_as_undefined_hd95(folders):
    array = box_case()
    array[array == 2] = 0
    write_label_map(folders["exact"] / "case_a.nii.gz", array)
    result = run_compare(folders)
    posterior = result["methods"]["exact"]["per_class"]["2"]
    assert posterior["hd95_undefined"] == 1 and posterior["dice"]["mean"] == pytest.approx(2 / 3)
    case_a = next(r for r in result["cases"] if (r["method"], r["case"], r["label"]) == ("exact", "case_a", "2"))
    assert (case_a["dice"], case_a["nsd"], case_a["hd95"]) == (0.0, 0.0, None)


def test_labels_default_to_those_found_in_the_ground_truth(folders):
    result = run_compare(folders)
    assert result["settings"]["labels"] == {"1": "1", "2": "2"}


def test_spacing_is_read_in_array_axis_order(folders):
    """SimpleITK spacing (1, 1, 3) is z = 3 mm: a one-slice shift along array axis 0 is 3 mm."""
    for folder in ("gt", "shifted"):
        for case in ("case_a", "case_b", "case_c"):
            path = folders[folder] / f"{case}.nii.gz"
            write_label_map(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), spacing_xyz=(1.0, 1.0, 3.0))
    result = run_compare(folders, preds={"shifted": str(folders["shifted"])})
    assert result["methods"]["shifted"]["per_class"]["1"]["hd95"]["mean"] == 3.0


def test_plots_are_valid_pngs(folders):
    run_compare(folders)
    for name in ("dice_per_class.png", "paired_cases.png"):
        path = folders["out"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(str(path)).std() > 0


def test_cases_to_show_are_each_candidates_loss_gain_and_median():
    per_case = {"base": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.5},
                "new": {"a": 0.9, "b": 0.1, "c": 0.55, "d": 0.5, "e": 0.6}}
    shown = {s.case: s.reasons for s in cases_to_show(per_case, "base")}
    assert shown == {"b": ("largest loss of new (-0.400)",), "c": ("median case of new (+0.050)",),
                     "a": ("largest gain of new (+0.400)",)}


def test_most_different_slice_is_where_the_methods_disagree():
    reference = box_case()
    a, b = box_case(), box_case()
    b[8] = 0  # label 2 lost on slice 8 only
    assert most_different_slice(reference, [a, b]) == 8
    assert most_different_slice(reference, [a, a.copy()]) == int(np.argmax((reference > 0).sum(axis=(1, 2))))


def test_contour_figures_on_real_images_are_linked_from_the_report(tmp_path):
    gt, eroded, shifted, images = (tmp_path / n for n in ("gt", "eroded", "shifted", "images"))
    for folder in (gt, eroded, shifted, images):
        folder.mkdir()
    cases = sorted(p.name[:-len(".nii.gz")] for p in (HIPPOCAMPUS / "labelsTr").iterdir())[:4]
    for index, case in enumerate(cases):
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", gt / f"{case}.nii.gz")
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", images / f"{case}_0000.nii.gz")
        reference = sitk.ReadImage(str(gt / f"{case}.nii.gz"))
        labels = sitk.GetArrayFromImage(reference)
        worse = np.where(binary_erosion(labels > 0), labels, 0)
        for folder, array in ((eroded, worse), (shifted, np.roll(labels, index, axis=1))):
            image = sitk.GetImageFromArray(array.astype(labels.dtype))
            image.CopyInformation(reference)
            sitk.WriteImage(image, str(folder / f"{case}.nii.gz"))
    out = tmp_path / "out"
    compare_folders(str(gt), {"eroded": str(eroded), "shifted": str(shifted)}, str(out),
                    labels_json=str(HIPPOCAMPUS / "dataset.json"), images_dir=str(images))
    figures = sorted(p.name for p in out.glob("contours_*.png"))
    # shifted by 0 voxels is its largest gain over the eroded baseline, by 3 its largest loss, one in between
    assert f"contours_{cases[0]}.png" in figures and f"contours_{cases[3]}.png" in figures and len(figures) == 3
    report = (out / "report.md").read_text()
    for name in figures:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(str(out / name))
        assert pixels.shape[0] > 200 and pixels.std() > 0.05
        assert f"]({name})" in report
    assert "largest gain of shifted" in report and "largest loss of shifted" in report
    assert "![Dice per class](dice_per_class.png)" in report


# --- bad input -----------------------------------------------------------------------------------------------------

def test_missing_case_is_a_warning_and_counted(folders):
    (folders["exact"] / "case_b.nii.gz").unlink()
    with pytest.warns(UserWarning, match="exact.*case_b"):
        result = run_compare(folders)
    assert result["missing"] == {"shifted": [], "exact": ["case_b"]}
    assert result["methods"]["exact"]["per_class"]["1"]["n_cases"] == 2
    assert result["paired"]["exact"]["1"]["n_cases"] == 2


def test_missing_case_is_refused_when_strict(folders):
    (folders["exact"] / "case_b.nii.gz").unlink()
    with pytest.raises(CompareError, match="exact.*case_b"):
        run_compare(folders, strict=True)


@pytest.mark.parametrize("num_processes", [1, 2])  # 2: the error comes back from a worker process
def test_geometry_mismatch_names_case_method_and_spacing(folders, num_processes):
    write_label_map(folders["exact"] / "case_c.nii.gz", box_case(), spacing_xyz=(1.0, 1.0, 2.0))
    with pytest.raises(CompareError, match=r"case_c.*exact.*spacing \(1\.0, 1\.0, 2\.0\) vs \(1\.0, 1\.0, 1\.0\)"):
        run_compare(folders, num_processes=num_processes)


def test_label_outside_the_dataset_is_refused(folders):
    array = box_case()
    array[0, 0, 0] = 3
    write_label_map(folders["shifted"] / "case_a.nii.gz", array)
    with pytest.raises(CompareError, match=r"shifted/case_a\.nii\.gz contains label\(s\) 3"):
        run_compare(folders, labels_json=str(folders["dataset_json"]))


def test_corrupt_file_is_named(folders):
    (folders["gt"] / "case_b.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(CompareError, match=r"label map .*gt/case_b\.nii\.gz cannot be read"):
        run_compare(folders, labels_json=str(folders["dataset_json"]))


@pytest.mark.parametrize("problem, match", [
    ("missing_prediction_folder", "does not exist"),
    ("empty_ground_truth", "holds no .nii.gz cases"),
])
def test_bad_folders(folders, problem, match):
    if problem == "missing_prediction_folder":
        shutil.rmtree(folders["exact"])
    else:
        for path in folders["gt"].iterdir():
            path.unlink()
    with pytest.raises(CompareError, match=match):
        run_compare(folders)


def test_an_error_leaves_earlier_outputs_untouched(folders):
    run_compare(folders)
    before = {p.name: p.read_bytes() for p in folders["out"].iterdir()}
    write_label_map(folders["exact"] / "case_c.nii.gz", np.zeros((5, 5, 5)))
    with pytest.raises(CompareError, match="size"):
        run_compare(folders)
    assert {p.name: p.read_bytes() for p in folders["out"].iterdir()} == before


# --- agreement with nnU-Net on real data ---------------------------------------------------------------------------

def test_dice_agrees_with_nnunet_on_hippocampus(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    gt, eroded, shifted = tmp_path / "gt", tmp_path / "eroded", tmp_path / "shifted"
    for folder in (gt, eroded, shifted):
        folder.mkdir()
    cases = sorted(p.name for p in (HIPPOCAMPUS / "labelsTr").iterdir())[:6]
    for name in cases:
        shutil.copy(HIPPOCAMPUS / "labelsTr" / name, gt / name)
        reference = sitk.ReadImage(str(gt / name))
        labels = sitk.GetArrayFromImage(reference)
        worse = np.zeros_like(labels)  # Anterior eroded, Posterior dilated into the background
        worse[binary_erosion(labels == 1)] = 1
        worse[binary_dilation(labels == 2) & ((labels == 0) | (labels == 2))] = 2
        for folder, array in ((eroded, worse), (shifted, np.roll(labels, 1, axis=1))):
            image = sitk.GetImageFromArray(array)
            image.CopyInformation(reference)
            sitk.WriteImage(image, str(folder / name))

    result = compare_folders(str(gt), {"eroded": str(eroded), "shifted": str(shifted)}, str(tmp_path / "out"),
                             labels_json=str(HIPPOCAMPUS / "dataset.json"))
    ours = {(r["method"], r["case"], r["label"]): r["dice"] for r in result["cases"]}
    compared = 0
    for method, folder in (("eroded", eroded), ("shifted", shifted)):
        nnunet = compute_metrics_on_folder(str(gt), str(folder), None, SimpleITKIO(), ".nii.gz", [1, 2],
                                           num_processes=1)
        for entry in nnunet["metric_per_case"]:
            case = Path(entry["reference_file"]).name[:-len(".nii.gz")]
            reference = sitk.GetArrayFromImage(sitk.ReadImage(entry["reference_file"]))
            prediction = sitk.GetArrayFromImage(sitk.ReadImage(entry["prediction_file"]))
            for label in (1, 2):
                independent = 2 * np.sum((reference == label) & (prediction == label)) / (
                    np.sum(reference == label) + np.sum(prediction == label))
                assert ours[method, case, str(label)] == pytest.approx(independent, abs=1e-4)
                if not math.isnan(entry["metrics"][label]["Dice"]):  # nnU-Net: NaN when both are empty
                    assert ours[method, case, str(label)] == pytest.approx(entry["metrics"][label]["Dice"], abs=1e-4)
                    compared += 1
    assert compared == 2 * len(cases) * 2


# --- the command -----------------------------------------------------------------------------------------------

def test_command_end_to_end_in_parallel(folders):
    proc = subprocess.run(
        [bin_command("nnUNetv2_rfmedsam_compare"), "--gt", str(folders["gt"]),
         "--pred", f"shifted={folders['shifted']}", "--pred", f"exact={folders['exact']}",
         "-o", str(folders["out"]), "--labels", str(folders["dataset_json"]), "-np", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.json", "report.md", "cases.csv", "dice_per_class.png", "paired_cases.png"):
        assert (folders["out"] / name).is_file()


@pytest.mark.parametrize("pred_arguments, match", [
    (["--pred", "no_equals_sign"], "NAME=DIR"),
    (["--pred", "a=/nonexistent/folder"], "does not exist"),
    (["--pred", "a={shifted}", "--pred", "a={exact}"], "given twice"),
])
def test_command_bad_input_exits_2_with_one_line(folders, pred_arguments, match):
    arguments = [a.format(shifted=folders["shifted"], exact=folders["exact"]) for a in pred_arguments]
    proc = subprocess.run([bin_command("nnUNetv2_rfmedsam_compare"), "--gt", str(folders["gt"]), *arguments,
                           "-o", str(folders["out"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert not folders["out"].exists()


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _nan_label_map(path: Path) -> None:
    array = box_case().astype(np.float32)
    array[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _shifted_origin(path: Path) -> None:
    write_label_map(path, box_case(), origin=(50.0, 0.0, 0.0))


def _unknown_label(path: Path) -> None:
    array = box_case()
    array[0, 0, 0] = 7
    write_label_map(path, array)


def _damaged_image(images: Path) -> None:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32))
    sitk.WriteImage(image, str(images / "case_b_0000.nii.gz"))
    _cut_short(images / "case_b_0000.nii.gz")


@pytest.mark.parametrize("damage, problem", [
    (_cut_short, r"label map .*exact/case_b\.nii\.gz cannot be read"),
    (_nan_label_map, r"label map .*exact/case_b\.nii\.gz: 1 of 1728 voxels are not finite \(NaN or infinite\)"),
    (_shifted_origin, r"case_b.*exact.*origin \(50\.0, 0\.0, 0\.0\) vs \(0\.0, 0\.0, 0\.0\)"),
    (_unknown_label, r"exact/case_b\.nii\.gz contains label\(s\) 7, not among the labels of .*dataset\.json"),
    (_damaged_image, r"image .*images/case_b_0000\.nii\.gz is damaged"),
])
def test_damaged_inputs_are_refused_in_one_line_before_anything_is_written(folders, capsys, damage, problem):
    """SimpleITK reads a .nii.gz cut short as an image padded with zeros and NaN as 0: the comparison checks its
    NIfTI files as stored, with their geometry and labels, and writes nothing."""
    from nnunetv2_rfmedsam.cli import compare as compare_cli
    images = folders["gt"].parent / "images"
    images.mkdir()
    damage(images if damage is _damaged_image else folders["exact"] / "case_b.nii.gz")
    with pytest.raises(SystemExit) as exit_:
        compare_cli.main(["--gt", str(folders["gt"]), "--pred", f"exact={folders['exact']}", "--images", str(images),
                          "--labels", str(folders["dataset_json"]), "-o", str(folders["out"])])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after the progress bar
    assert len(errors) == 1 and re.match(f"error: .*{problem}", errors[0]), errors
    assert not folders["out"].exists()
