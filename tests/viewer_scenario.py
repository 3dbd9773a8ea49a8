"""A person's session in the napari plugin, run headless (under Xvfb) by tests/test_viewer.py in a process of its
own, so that Qt and OpenGL stay out of the test workers.

    python tests/viewer_scenario.py STAGE2_MODEL_DIR IMAGE TRUTH OUT_DIR [--box-screenshots]

Opens the image with the plugin's reader and the model in the dock widget, runs the automatic pass, removes a
false positive of class 1 by a negative click, adds a box for class 2, undoes both, and saves; it
records what it saw in OUT_DIR/observations.json, the label maps in OUT_DIR/label_maps.npz and screenshots as
PNG (with --box-screenshots also the box's slice before and after it: the README's picture); last, it asks for a
checkpoint that is not there. It asserts nothing: the test does.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TIMEOUT = 600


def wait_until_idle(app, widget) -> float:
    start = time.perf_counter()
    while widget.busy:
        if time.perf_counter() - start > TIMEOUT:
            raise TimeoutError("the widget's worker did not finish")
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()
    return time.perf_counter() - start


def settle(app, seconds: float = 0.5) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def overlay_share(first: np.ndarray, second: np.ndarray) -> float:
    """The share of pixels that differ between two screenshots (as tests/test_viewer.py counts them)."""
    if first.shape != second.shape:
        return 0.0
    return float((np.abs(first[..., :3].astype(int) - second[..., :3].astype(int)).max(axis=-1) > 12).mean())


def grab(app, viewer, widget, slice_index: int, path: Path, without_path: Path) -> None:
    """Screenshots of the window on a slice, with the label overlay (`path`) and without it."""
    widget.go_to_slice(slice_index)
    app.processEvents()
    deadline = time.perf_counter() + 30
    while True:
        widget.labels_layer.visible = False
        settle(app)
        without = viewer.screenshot(str(without_path), canvas_only=False)
        widget.labels_layer.visible = True
        settle(app)
        with_labels = viewer.screenshot(str(path), canvas_only=False)
        if overlay_share(with_labels, without) > 0.01 or time.perf_counter() > deadline:
            break


def main(model_dir: str, image: str, truth_path: str, out: str, screenshots_of_the_box: bool = False) -> None:
    from qtpy.QtWidgets import QApplication
    from nnunetv2_rfmedsam.viewer.launch import open_viewer
    from nnunetv2_rfmedsam.viewer.widget import BOXES, NEGATIVE, SLICE_ROLE

    out_dir = Path(out)
    observations: dict = {"errors": []}
    viewer, widget = open_viewer(image, model_dir, show=True)  # on the virtual screen: the canvas gets its size
    viewer.window._qt_window.resize(1200, 800)
    app = QApplication.instance()
    progress = []
    widget._progress.changed.connect(lambda done, total, message: progress.append([done, total, message]))
    original_fail = widget._fail
    widget._fail = lambda error: (observations["errors"].append(str(error)), original_fail(error))
    image_layer = viewer.layers[0]
    observations["image_layer"] = {"name": image_layer.name, "shape": list(image_layer.data.shape),
                                   "scale": list(map(float, image_layer.scale))}

    widget.start_automatic_pass()
    observations["automatic_seconds"] = wait_until_idle(app, widget)
    observations["progress"] = progress
    if widget.labels_layer is None:
        (out_dir / "observations.json").write_text(json.dumps(observations))
        return
    automatic = np.array(widget.labels_layer.data)
    observations["layers"] = [layer.name for layer in viewer.layers]
    observations["label_names"] = dict(zip(map(str, widget.labels_layer.features["index"]),
                                           widget.labels_layer.features["name"]))
    observations["seconds"] = widget.result.seconds
    observations["doubtful"] = [widget.doubtful.item(i).text() for i in range(widget.doubtful.count())]
    if widget.doubtful.count():
        widget.doubtful.setCurrentRow(widget.doubtful.count() - 1)
        app.processEvents()
        observations["went_to"] = {"item": widget.doubtful.currentItem().data(SLICE_ROLE),
                                   "current_step": int(viewer.dims.current_step[0])}

    # a false positive of class 1: predicted, not in the ground truth; on the slice with most of them
    truth = sitk.GetArrayFromImage(sitk.ReadImage(truth_path))
    false_positive = (automatic == 1) & (truth != 1)
    slice_index = int(np.argmax(false_positive.sum(axis=(1, 2))))
    y, x = np.argwhere(false_positive[slice_index])[0]
    observations["click"] = [slice_index, int(y), int(x)]
    widget.class_choice.setCurrentIndex(widget.class_choice.findData(1))
    viewer.layers[NEGATIVE].add([slice_index, y, x])
    widget.start_refine()
    wait_until_idle(app, widget)
    observations["click_latency"] = widget.last_latency
    observations["click_latency_parts"] = widget.last_latency_parts
    after_click = np.array(widget.labels_layer.data)
    # the window (an offscreen canvas alone renders black under Xvfb), with the overlay and without, on the slice
    # with the most labelled voxels (the click may have left its own slice with few); the canvas redraws when Qt
    # gets to it, which on a loaded machine took longer than one round of events: both shots are retaken until
    # they differ (either one may have been taken before the canvas showed its layer change)
    grab(app, viewer, widget, int(np.argmax((after_click > 0).sum(axis=(1, 2)))), out_dir / "viewer.png",
         out_dir / "viewer_without_labels.png")
    saved = widget.save(out_dir / "corrected.nii.gz")
    observations["saved"] = str(saved)

    # a box for class 2 around the structure (its ground truth) on its largest slice, as a person draws it: the
    # automatic result of the random SAM 2 here may have lost class 2 altogether
    class2_slice = int(np.argmax((truth == 2).sum(axis=(1, 2))))
    observations["box_slice"] = class2_slice
    ys, xs = np.nonzero(truth[class2_slice] == 2)
    corners = [[class2_slice, ys.min(), xs.min()], [class2_slice, ys.min(), xs.max()],
               [class2_slice, ys.max(), xs.max()], [class2_slice, ys.max(), xs.min()]]
    widget.class_choice.setCurrentIndex(widget.class_choice.findData(2))
    viewer.layers[BOXES].add_rectangles(np.array(corners, dtype=float))
    if screenshots_of_the_box:
        grab(app, viewer, widget, class2_slice, out_dir / "viewer_before_box.png", out_dir / "viewer_plain.png")
    widget.start_refine()
    wait_until_idle(app, widget)
    if screenshots_of_the_box:
        grab(app, viewer, widget, class2_slice, out_dir / "viewer_after_box.png", out_dir / "viewer_plain.png")
    observations["box_latency"] = widget.last_latency
    after_box = np.array(widget.labels_layer.data)
    widget.undo()
    after_first_undo = np.array(widget.labels_layer.data)
    observations["boxes_after_undo"] = len(viewer.layers[BOXES].data)
    widget.undo()
    after_second_undo = np.array(widget.labels_layer.data)
    observations["negative_clicks_after_undo"] = len(viewer.layers[NEGATIVE].data)
    observations["undo_enabled_at_end"] = widget.undo_button.isEnabled()

    # a folder that is not a model folder, then a checkpoint that is not there: the errors are shown, the viewer
    # and its label map stay
    model_dir = widget.stage2_folder.text()
    widget.stage2_folder.setText(str(out_dir))
    widget.start_automatic_pass()
    observations["status_after_wrong_folder"] = widget.status.text()
    widget.stage2_folder.setText(model_dir)
    widget.checkpoint.setText("checkpoint_missing.pth")
    widget.start_automatic_pass()
    wait_until_idle(app, widget)
    observations["status_after_error"] = widget.status.text()
    observations["labels_kept_after_error"] = bool(np.array_equal(widget.labels_layer.data, after_second_undo))
    np.savez_compressed(out_dir / "label_maps.npz", automatic=automatic, after_click=after_click, after_box=after_box,
                        after_first_undo=after_first_undo, after_second_undo=after_second_undo,
                        stage1=widget.result.stage1)
    (out_dir / "observations.json").write_text(json.dumps(observations, indent=1))
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:5], screenshots_of_the_box="--box-screenshots" in sys.argv[5:])
