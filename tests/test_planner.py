import json

import pytest

from conftest import DATASET_ID, DATASET_NAME, PLANS, TEST_SAM2_IMAGE_SIZE, bin_command, run_command
from nnunetv2_rfmedsam.settings import NETWORK_CLASS, SAM2Settings, SettingsError


def load_plans(workspace, name=PLANS):
    return json.loads((workspace["root"] / "preprocessed" / DATASET_NAME / f"{name}.json").read_text())


def test_rfmedsam2_configuration_is_linked_to_3d_fullres(planned_workspace):
    configurations = load_plans(planned_workspace)["configurations"]
    stage1, stage2 = configurations["3d_fullres"], configurations["3d_rfmedsam2"]
    assert stage1["next_stage"] == "3d_rfmedsam2"
    assert stage2["previous_stage"] == "3d_fullres"
    assert "next_stage" not in stage2
    assert stage2["data_identifier"] == stage1["data_identifier"]
    assert stage2["architecture"]["network_class_name"] == NETWORK_CLASS
    # hippocampus MRI is z-scored: the planner writes the z-score window of SAM 2's pixel range
    assert stage2["architecture"]["arch_kwargs"] == SAM2Settings(image_size=TEST_SAM2_IMAGE_SIZE,
                                                                 intensity_windows=[[-3.0, 3.0]]).to_plans()
    assert stage2["patch_size"][0] == SAM2Settings().slices_per_patch
    assert all(p >= m for p, m in zip(stage2["patch_size"][1:], stage1["median_image_size_in_voxels"][1:]))


def test_default_settings_are_written():
    written = SAM2Settings().to_plans()
    assert written == {"model_size": "tiny", "image_size": 1024, "adapter_width": 32, "refinement_passes": 2,
                       "slices_per_patch": 8, "objects_per_step": None, "use_memory": True, "box_jitter": 0.1,
                       "train_with_clicks": True,
                       "training_prompt_dropout": 0.25, "start_at_prompt": True, "presence_loss_weight": 1.0,
                       "intensity_windows": None, "test_time_mirroring": False}


def test_stage2_mirrors_at_test_time_only_when_the_plans_say_so():
    from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import stage2_mirror_axes
    assert stage2_mirror_axes(SAM2Settings().to_plans(), 3) is None  # nnU-Net's "no mirroring"
    assert stage2_mirror_axes(SAM2Settings(test_time_mirroring=True).to_plans(), 3) == (2,)


def test_standard_configurations_equal_stock_planning(planned_workspace):
    """The baseline trains from the same plans: every stock configuration must be what nnU-Net plans."""
    run_command([bin_command("nnUNetv2_plan_experiment"), "-d", str(DATASET_ID)], planned_workspace["env"])
    stock = load_plans(planned_workspace, "nnUNetPlans")["configurations"]
    ours = load_plans(planned_workspace)["configurations"]
    assert set(ours) == set(stock) | {"3d_rfmedsam2"}
    for name, configuration in stock.items():
        mine = {k: v for k, v in ours[name].items() if k not in ("data_identifier", "next_stage")}
        theirs = {k: v for k, v in configuration.items() if k != "data_identifier"}
        assert mine == theirs, name


def test_sam2_cli_options_reach_the_plans(nnunet_workspace, tmp_path):
    env = dict(nnunet_workspace["env"], nnUNet_preprocessed=str(tmp_path / "pre"))
    run_command([bin_command("nnUNetv2_rfmedsam_plan_and_preprocess"), "-d", str(DATASET_ID), "--no_pp",
                 "-npfp", "1", "--sam2-model", "small", "--sam2-image-size", "256", "--sam2-passes", "1",
                 "--sam2-no-memory", "--sam2-plain-refiner", "--sam2-no-presence-loss", "--sam2-test-time-mirroring"],
                env)
    plans = json.loads((tmp_path / "pre" / DATASET_NAME / f"{PLANS}.json").read_text())
    written = plans["configurations"]["3d_rfmedsam2"]["architecture"]["arch_kwargs"]
    assert (written["model_size"], written["image_size"], written["refinement_passes"], written["use_memory"],
            written["start_at_prompt"], written["presence_loss_weight"], written["test_time_mirroring"]) == \
        ("small", 256, 1, False, False, 0.0, True)


@pytest.mark.parametrize("option, value, expected", [
    ("--sam2-image-size", "300", "multiple of 32"),
    ("--sam2-image-size", "abc", "multiple of 32"),
    ("--sam2-model", "huge", "tiny, small, base_plus, large"),
    ("--sam2-passes", "3", "allowed: 1, 2"),
])
def test_bad_sam2_options_are_refused_before_anything_is_written(nnunet_workspace, tmp_path, monkeypatch, capsys,
                                                                option, value, expected):
    from nnunetv2_rfmedsam.cli import plan_and_preprocess
    # the command's own entry point, in this process: nnU-Net 2.8 reads its folders from the environment when used
    monkeypatch.setenv("nnUNet_raw", nnunet_workspace["env"]["nnUNet_raw"])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    with pytest.raises(SystemExit) as exited:
        plan_and_preprocess.main(["-d", str(DATASET_ID), option, value])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert option in lines[0] and expected in lines[0]
    assert not (tmp_path / "pre").exists()


def test_unknown_dataset_gives_nnunets_own_error(nnunet_workspace, tmp_path, monkeypatch):
    from nnunetv2_rfmedsam.cli import plan_and_preprocess
    monkeypatch.setenv("nnUNet_raw", nnunet_workspace["env"]["nnUNet_raw"])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    with pytest.raises(RuntimeError, match="999"):
        plan_and_preprocess.main(["-d", "999"])
    assert not (tmp_path / "pre").exists()


def test_settings_reject_invalid_values():
    with pytest.raises(SettingsError, match="image_size"):
        SAM2Settings(image_size=100)
    with pytest.raises(SettingsError, match="model_size"):
        SAM2Settings(model_size="medium")
    assert SAM2Settings.from_plans({**SAM2Settings(image_size=128).to_plans(), "unrelated": 1}).image_size == 128


def test_only_3d_fullres_feeds_the_refiner_not_the_stock_cascade_inheriting_from_it(planned_workspace):
    """nnU-Net's 3d_cascade_fullres inherits from 3d_fullres: it must not inherit next_stage 3d_rfmedsam2 too,
    or its trainings would export predictions for a stage they do not feed."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_rfmedsam.planners.rfmedsam2_planner import add_rfmedsam2_stage

    plans = load_plans(planned_workspace)
    configurations = plans["configurations"]
    del configurations["3d_rfmedsam2"], configurations["3d_fullres"]["next_stage"]
    # what nnU-Net's planner writes for a dataset large enough for a low-resolution stage
    configurations["3d_lowres"] = dict(configurations["3d_fullres"], next_stage="3d_cascade_fullres")
    configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    add_rfmedsam2_stage(plans, SAM2Settings(image_size=TEST_SAM2_IMAGE_SIZE))
    manager = PlansManager(plans)
    assert manager.get_configuration("3d_fullres").next_stage_names == ["3d_rfmedsam2"]
    assert manager.get_configuration("3d_cascade_fullres").next_stage_names is None
    assert manager.get_configuration("3d_cascade_fullres").previous_stage_name == "3d_lowres"
    assert manager.get_configuration("3d_lowres").next_stage_names == ["3d_cascade_fullres"]


@pytest.mark.parametrize("planner, plans_name", [
    ("nnUNetPlannerRFMedSAM2", PLANS),
    ("ExperimentPlanner", PLANS),  # the default planner's base: the same plans
    ("nnUNetPlannerResEncM", "nnUNetResEncUNetMRFMedSAM2Plans"),
    ("nnUNetPlannerResEncL", "nnUNetResEncUNetLRFMedSAM2Plans"),
])
def test_each_planner_writes_plans_of_its_own_name(planner, plans_name):
    from nnunetv2_rfmedsam.cli.plan_and_preprocess import default_plans_name, resolve_planner_class
    assert default_plans_name(resolve_planner_class(planner)) == plans_name
