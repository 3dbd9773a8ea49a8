"""`nnUNetv2_rfmedsam_viewer`: napari with the RFMedSAM 2 dock widget, optionally an image and a model.

    nnUNetv2_rfmedsam_viewer [IMAGE.nii.gz] [-m STAGE2_MODEL_FOLDER] [-f FOLD ...] [-device cpu|cuda]

The same as starting `napari`, opening the image and choosing Plugins > RFMedSAM 2.
"""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_rfmedsam_viewer",
                                     description="Open napari with the RFMedSAM 2 widget: automatic segmentation "
                                                 "by stage 1 and the cascade, then corrections by clicks and boxes.")
    parser.add_argument("image", nargs="?", help="an image to open (NIfTI, MHA, NRRD)")
    parser.add_argument("-m", metavar="MODEL_DIR", help="trained stage-2 model folder "
                                                        "(nnUNetTrainerRFMedSAM2__<plans>__3d_rfmedsam2)")
    parser.add_argument("-f", nargs="+", metavar="FOLD", help="folds (default: every finished fold)")
    parser.add_argument("-device", default="cpu", choices=("cpu", "cuda"))
    return parser


def open_viewer(image=None, model_dir=None, folds=None, device="cpu", show=True):
    """A napari viewer with the widget docked; returns (viewer, widget)."""
    import napari
    from nnunetv2_rfmedsam.viewer.widget import RFMedSAM2Widget
    viewer = napari.Viewer(title="RFMedSAM 2", show=show)
    widget = RFMedSAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="RFMedSAM 2", area="right")
    if image:
        viewer.open(image, plugin="nnunetv2_rfmedsam")
    if model_dir:
        widget.stage2_folder.setText(str(model_dir))
    if folds:
        widget.folds.setText(" ".join(folds))
    widget.device.setCurrentText(device)
    return viewer, widget


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    import napari
    open_viewer(args.image, args.m, args.f, args.device)
    napari.run()


if __name__ == "__main__":
    main()
