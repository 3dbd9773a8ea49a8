"""The napari plugin: open an image, run stage 1 and the cascade, correct one class at a time, save.

reader.py (SimpleITK reader), automatic_pass.py (both stages through nnU-Net's predictor), doubtful_slices.py
(where to look), widget.py (the dock widget, the only module that imports Qt and napari), launch.py
(`nnUNetv2_rfmedsam_viewer`). The person's clicks and boxes go through interactive/corrections.py.
"""
