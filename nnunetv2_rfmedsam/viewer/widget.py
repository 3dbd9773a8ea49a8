"""The dock widget: model, automatic pass, corrections, doubtful slices, save.

Long work (the automatic pass, a refinement) runs in a worker thread (napari's `create_worker`); its progress
and result come back to the Qt thread by signal, so the viewer stays responsive. Layers:
- "<image> RFMedSAM 2": the label map (a Labels layer, with the dataset's label names as features);
- "positive clicks" (green), "negative clicks" (red): Points layers; "boxes": a Shapes layer of rectangles.
New clicks and boxes, on any slice, go to the selected class at the next "Refine".
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import napari
import numpy as np
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QLineEdit, QListWidget, QListWidgetItem, QProgressBar, QPushButton, QVBoxLayout,
                            QWidget)

from nnunetv2_rfmedsam.viewer.automatic_pass import STEPS, AutomaticResult, ModelChoice, run_automatic_pass
from nnunetv2_rfmedsam.interactive.corrections import Box, Click, Corrections
from nnunetv2_rfmedsam.viewer.doubtful_slices import doubtful_slices
from nnunetv2_rfmedsam.viewer.prompt_layers import boxes_from_rectangles, clicks_from_points, image_geometry
from nnunetv2_rfmedsam.viewer.reader import SOURCE_PATH

POSITIVE, NEGATIVE, BOXES = "positive clicks", "negative clicks", "boxes"
# one colour per class, distinct on a grey image (Okabe-Ito), then repeating
SLICE_ROLE = Qt.ItemDataRole.UserRole  # a doubtful-slice entry's slice index
CLASS_COLOURS = ("#e69f00", "#56b4e9", "#009e73", "#f0e442", "#cc79a7", "#d55e00", "#0072b2")


def _shows_errors(slot):
    """A button's slot: an exception becomes the widget's error line (PyQt aborts the process on an exception
    that leaves a slot)."""
    @functools.wraps(slot)
    def guarded(self, *args):
        try:
            return slot(self)
        except Exception as error:  # whatever went wrong, the person sees it and the viewer stays
            self._fail(error)
    return guarded


class _Progress(QObject):
    changed = Signal(int, int, str)


class RFMedSAM2Widget(QWidget):
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.result: AutomaticResult | None = None
        self.corrections: Corrections | None = None
        self.image_layer = None
        self.labels_layer = None
        self.worker = None
        self.last_latency: float | None = None  # seconds from "Refine" to the updated layer
        self.last_latency_parts: dict[str, float] = {}  # of which the refinement, and the layer's update
        self._used = {POSITIVE: 0, NEGATIVE: 0, BOXES: 0}  # rows of each prompt layer already refined
        self._used_before: list[dict[str, int]] = []       # per refinement, for undo
        self._progress = _Progress()
        self._progress.changed.connect(self._show_progress)
        self._build()
        self.viewer.layers.events.inserted.connect(self._list_images)
        self.viewer.layers.events.removed.connect(self._list_images)
        self._list_images()

    # --- layout ---

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        model = QGroupBox("Model")
        form = QFormLayout(model)
        self.stage2_folder = QLineEdit()
        self.stage2_folder.setPlaceholderText("nnUNetTrainerRFMedSAM2__<plans>__3d_rfmedsam2 folder")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.stage2_folder)
        row.addWidget(browse)
        form.addRow("stage 2", row)
        self.folds = QLineEdit()
        self.folds.setPlaceholderText("default: every finished fold")
        form.addRow("stage-2 folds", self.folds)
        self.checkpoint = QLineEdit("checkpoint_final.pth")
        form.addRow("stage-2 checkpoint", self.checkpoint)
        self.device = QComboBox()
        self.device.addItems(["cpu", "cuda"])
        form.addRow("device", self.device)
        self.image_choice = QComboBox()
        form.addRow("image", self.image_choice)
        layout.addWidget(model)

        self.run_button = QPushButton("Automatic pass (stage 1 + cascade)")
        self.run_button.clicked.connect(self.start_automatic_pass)
        layout.addWidget(self.run_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, STEPS)
        layout.addWidget(self.progress_bar)
        self.status = QLabel("Open an image (File > Open), choose the stage-2 model folder, run the automatic pass.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

        correct = QGroupBox("Correct")
        form = QFormLayout(correct)
        self.class_choice = QComboBox()
        form.addRow("class", self.class_choice)
        self.overwrite = QCheckBox("may take other classes' voxels")
        form.addRow(self.overwrite)
        # off: only the prompted slices change, as SAM 2's video predictor keeps its conditioning frames
        self.propagate = QCheckBox("propagate to the other slices")
        form.addRow(self.propagate)
        buttons = QHBoxLayout()
        self.refine_button, self.undo_button, self.reset_button = (QPushButton(t) for t in ("Refine", "Undo", "Reset"))
        self.refine_button.clicked.connect(self.start_refine)
        self.undo_button.clicked.connect(self.undo)
        self.reset_button.clicked.connect(self.reset)
        for button in (self.refine_button, self.undo_button, self.reset_button):
            buttons.addWidget(button)
        form.addRow(buttons)
        layout.addWidget(correct)

        layout.addWidget(QLabel("Doubtful slices (choose one to go there):"))
        self.doubtful = QListWidget()
        self.doubtful.currentItemChanged.connect(self._go_to_doubtful)
        layout.addWidget(self.doubtful)
        self.save_button = QPushButton("Save label map...")
        self.save_button.clicked.connect(self._choose_save_path)
        layout.addWidget(self.save_button)
        self._enable()

    def _enable(self) -> None:
        busy = self.worker is not None
        ready = self.corrections is not None and not busy
        self.run_button.setEnabled(not busy)
        for button in (self.refine_button, self.reset_button, self.save_button):
            button.setEnabled(ready)
        self.undo_button.setEnabled(ready and self.corrections.can_undo)

    @property
    def busy(self) -> bool:
        return self.worker is not None

    # --- inputs ---

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Trained stage-2 model folder")
        if folder:
            self.stage2_folder.setText(folder)

    def _list_images(self, *_) -> None:
        current = self.image_choice.currentText()
        self.image_choice.clear()
        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, napari.layers.Image) and SOURCE_PATH in layer.metadata]
        self.image_choice.addItems(names)
        if current in names:
            self.image_choice.setCurrentText(current)

    def model_choice(self) -> ModelChoice:
        folder = self.stage2_folder.text().strip()
        if not folder:
            raise ValueError("choose the trained stage-2 model folder first")
        return ModelChoice.beside(folder, self.folds.text().split() or None, self.checkpoint.text().strip(),
                                  self.device.currentText())

    # --- automatic pass ---

    @_shows_errors
    def start_automatic_pass(self) -> None:
        name = self.image_choice.currentText()
        if not name:
            raise ValueError("open an image with this plugin's reader first (File > Open, a NIfTI file)")
        self.image_layer = self.viewer.layers[name]
        models = self.model_choice()
        path = self.image_layer.metadata[SOURCE_PATH]
        self._run(run_automatic_pass, self._automatic_pass_done, path, models, self._progress.changed.emit)

    def _automatic_pass_done(self, result: AutomaticResult) -> None:
        self.result = result
        self.corrections = Corrections(result.session, result.cascade)
        names = result.session.class_names
        self.class_choice.clear()
        for class_id, class_name in sorted(names.items()):
            self.class_choice.addItem(f"{class_id}: {class_name}", class_id)
        labels_name = f"{self.image_layer.name} RFMedSAM 2"
        if labels_name in self.viewer.layers:
            self.viewer.layers.remove(labels_name)
        geometry = image_geometry(self.image_layer)
        label_names = {0: "background", **names}
        colours = {None: "white", 0: "transparent",
                   **{c: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, c in enumerate(sorted(names))}}
        self.labels_layer = self.viewer.add_labels(
            result.cascade.copy(), name=labels_name, opacity=0.6, colormap=DirectLabelColormap(color_dict=colours),
            features={"index": list(label_names), "name": list(label_names.values())}, **geometry)
        for layer_name in (POSITIVE, NEGATIVE, BOXES):
            if layer_name in self.viewer.layers:
                self.viewer.layers.remove(layer_name)
        self.viewer.add_points(ndim=3, name=POSITIVE, face_color="lime", size=3, **geometry)
        self.viewer.add_points(ndim=3, name=NEGATIVE, face_color="red", size=3, **geometry)
        self.viewer.add_shapes(ndim=3, name=BOXES, edge_color="yellow", face_color="transparent", edge_width=0.5,
                               **geometry)
        self._used = {POSITIVE: 0, NEGATIVE: 0, BOXES: 0}
        self._used_before.clear()
        self.viewer.layers.selection.active = self.viewer.layers[POSITIVE]
        self._list_doubtful()
        self.viewer.reset_view()
        seconds = ", ".join(f"{step} {s:.1f} s" for step, s in result.seconds.items())
        self.status.setText(f"Automatic pass done ({seconds}). Pick a class, add clicks or boxes, then Refine.")

    def _list_doubtful(self) -> None:
        self.doubtful.clear()
        result = self.result
        for found in doubtful_slices(result.stage1, result.cascade, result.stage1_probabilities,
                                     result.session.channel_of_label):
            item = QListWidgetItem(found.describe(result.session.class_names[found.class_id]))
            item.setData(SLICE_ROLE, found.slice_index)
            self.doubtful.addItem(item)

    def _go_to_doubtful(self, item, _previous=None) -> None:
        if item is not None:
            self.go_to_slice(item.data(SLICE_ROLE))

    def go_to_slice(self, slice_index: int) -> None:
        layer = self.image_layer
        self.viewer.dims.set_point(0, layer.translate[0] + slice_index * layer.scale[0])

    # --- corrections ---

    def new_prompts(self) -> tuple[list[Click], list[Box]]:
        """The clicks and boxes added since the last refinement, as voxel indices of the image (prompt_layers.py)."""
        clicks = [click for layer_name, positive in ((POSITIVE, True), (NEGATIVE, False))
                  for click in clicks_from_points(self.viewer.layers[layer_name].data[self._used[layer_name]:],
                                                  positive)]
        return clicks, boxes_from_rectangles(self.viewer.layers[BOXES].data[self._used[BOXES]:])

    @_shows_errors
    def start_refine(self) -> None:
        clicks, boxes = self.new_prompts()
        if not clicks and not boxes:
            raise ValueError("add clicks (the positive or negative clicks layer) or a box (the boxes layer) first")
        class_id = self.class_choice.currentData()
        started = time.perf_counter()
        used_now = {name: len(self.viewer.layers[name].data) for name in self._used}
        base = np.asarray(self.labels_layer.data)
        overwrite, propagate = self.overwrite.isChecked(), self.propagate.isChecked()

        def refine() -> tuple[np.ndarray, float]:
            label_map = self.corrections.refine(class_id, clicks, boxes, overwrite, base, propagate)
            return label_map, time.perf_counter() - started

        def done(result: tuple[np.ndarray, float]) -> None:
            label_map, computed = result
            self._used_before.append(dict(self._used))
            self._used = used_now
            self.labels_layer.data = label_map
            self.last_latency = time.perf_counter() - started
            self.last_latency_parts = {"refinement": computed, "layer update": self.last_latency - computed}
            self.status.setText(f"Refined class {class_id} with {len(clicks)} click(s) and {len(boxes)} box(es) in "
                                f"{self.last_latency:.1f} s.")

        self._run(refine, done)

    @_shows_errors
    def undo(self) -> None:
        self.labels_layer.data = self.corrections.undo()
        self._used = self._used_before.pop()
        self._trim_prompt_layers()
        self.status.setText("Undone.")
        self._enable()

    @_shows_errors
    def reset(self) -> None:
        self.labels_layer.data = self.corrections.reset()
        self._used = {POSITIVE: 0, NEGATIVE: 0, BOXES: 0}
        self._used_before.clear()
        self._trim_prompt_layers()
        self.status.setText("Back to the automatic pass.")
        self._enable()

    def _trim_prompt_layers(self) -> None:
        """Prompt layers keep only the clicks and boxes of the refinements still applied."""
        for name, count in self._used.items():
            layer = self.viewer.layers[name]
            if len(layer.data) > count:
                layer.data = layer.data[:count]

    # --- saving ---

    @_shows_errors
    def _choose_save_path(self) -> None:
        source = Path(self.image_layer.metadata[SOURCE_PATH])
        suggestion = source.with_name(source.name.replace("_0000", "").replace(".nii.gz", "_rfmedsam2.nii.gz"))
        path, _ = QFileDialog.getSaveFileName(self, "Save label map", str(suggestion), "NIfTI (*.nii.gz *.nii)")
        if path:
            self.save(path)

    def save(self, path) -> Path:
        """Write the label layer with the image's geometry, atomically."""
        written = self.corrections.session.image.write(np.asarray(self.labels_layer.data), path)
        self.status.setText(f"Saved {written}.")
        return written

    # --- workers ---

    def _run(self, function, on_done, *args) -> None:
        # an "errored" handler given here replaces napari's default, which re-raises in the Qt thread (and PyQt
        # aborts the process on an exception in a slot)
        self.worker = create_worker(function, *args, _start_thread=False, _connect={
            "returned": on_done, "errored": self._fail, "finished": self._worker_finished})
        self._enable()
        self.worker.start()

    def _worker_finished(self) -> None:
        self.worker = None
        self._enable()

    def _show_progress(self, done: int, total: int, message: str) -> None:
        self.progress_bar.setMaximum(total)
        self.progress_bar.setValue(done)
        self.status.setText(message)

    def _fail(self, error: Exception) -> None:
        message = " ".join(str(error).split())
        self.status.setText(f"Error: {message}")
        napari.utils.notifications.show_error(message)
