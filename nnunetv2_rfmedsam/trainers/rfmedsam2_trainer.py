import os
from os.path import join

import torch
import torch.distributed as dist
from torch._dynamo import OptimizedModule

from nnunetv2.paths import nnUNet_results
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_rfmedsam.budget import EnvironmentBudgetMixin
from nnunetv2_rfmedsam.dataset_support import SupportedDatasetMixin
from nnunetv2_rfmedsam.model.network import PROMPT_GATE_LOGITS
from nnunetv2_rfmedsam.model.sam2_checkpoint import SAM2CheckpointError
from nnunetv2_rfmedsam.settings import (OFFICIAL_CHECKPOINT_HINT, SAM2_CHECKPOINT_VARIABLE, STAGE1_TRAINER,
                                        SAM2Settings)
from nnunetv2_rfmedsam.trainers.atomic_checkpoints import AtomicCheckpointMixin
from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss
from nnunetv2_rfmedsam.trainers.schedule import WarmupPolyLRScheduler

ALLOW_RANDOM_INIT_VARIABLE = "RFMEDSAM2_ALLOW_RANDOM_INIT"


class StageOnePredictionsMissing(FileNotFoundError):
    pass


def weights_fingerprint(network: torch.nn.Module) -> tuple[float, ...]:
    """One sum per floating-point tensor of the state dict: any load of other weights changes it."""
    with torch.no_grad():
        return tuple(float(t.float().sum()) for t in network.state_dict().values() if t.is_floating_point())


def stage2_mirror_axes(arch_kwargs: dict, dimensions: int) -> tuple[int, ...] | None:
    """The test-time mirroring axes stage 2 allows, by the plans' SAM 2 settings (None: no mirroring)."""
    return (dimensions - 1,) if SAM2Settings.from_plans(arch_kwargs).test_time_mirroring else None


def optimizer_parameter_groups(network: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters as AdamW's parameter groups: the prompt gates' logits without weight decay (it
    would pull each logit towards 0, its gate towards 0.5 rather than towards the prompt), the rest with it."""
    trainable = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
    # by the last name part: torch.compile's wrapper prefixes the names
    gates = [p for name, p in trainable if name.rsplit(".", 1)[-1] == PROMPT_GATE_LOGITS]
    rest = [p for name, p in trainable if name.rsplit(".", 1)[-1] != PROMPT_GATE_LOGITS]
    groups = [{"params": rest, "weight_decay": weight_decay}, {"params": gates, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class nnUNetTrainerRFMedSAM2(AtomicCheckpointMixin, SupportedDatasetMixin, EnvironmentBudgetMixin,
                             nnUNetTrainer):
    """Stage 2, the SAM 2 refiner: nnUNetTrainer, except

    - the network is the plans' `RFMedSAM2Network` (SAM 2 with adapters), built by the stock
      `build_network_architecture`; its SAM 2 weights are loaded from an official checkpoint when training starts;
    - AdamW with warmup on the trainable parameters only (adapters, mask-decoder heads, prompt gates), without
      weight decay on the prompt gates' logits (`optimizer_parameter_groups`);
    - no deep supervision; every refinement pass is supervised instead;
    - stage-1 predictions come from nnUNetTrainerRFPrompt's `predicted_next_stage` folder;
    - test-time mirroring off, or along one in-plane axis with the plans' `test_time_mirroring`;
    - each training step hands the network its target, for the second pass's clicks at the first pass's errors;
    - region-based datasets and more than three image channels are refused (dataset_support.py);
    - checkpoints replace their files atomically (a kill while one is written loses nothing).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = 3e-4
        self.weight_decay = 1e-2
        self.warmup_fraction = 0.05
        if self.is_cascaded and nnUNet_results:  # 2.8.1: a lazy path object, false when unset
            # nnU-Net looks for the previous stage under this trainer's own name; stage 1 is another trainer
            self.folder_with_segs_from_previous_stage = join(
                nnUNet_results, self.plans_manager.dataset_name,
                f"{STAGE1_TRAINER}__{self.plans_manager.plans_name}__{self.configuration_manager.previous_stage_name}",
                "predicted_next_stage", self.configuration_name)

    @property
    def network_module(self):
        module = self.network.module if self.is_ddp else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    def _do_i_compile(self):
        # nnU-Net compiles the whole network (and its Dice loss) when this says so; for the refiner that would compile
        # the walk through the slices, so `initialize` compiles SAM 2's per-slice modules instead (compilation.py)
        return False

    def _compiles_per_slice_step(self) -> bool:
        """nnU-Net's rule (not on the CPU, MPS or Windows), but only when `nnUNet_compile` asks for it: stage 2's
        compile has not run on a GPU yet, so it is not on by default as stage 1's is."""
        return nnUNetTrainer._do_i_compile(self) and \
            os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")

    def _set_batch_size_and_oversample(self):
        # nnU-Net splits the planned batch over the GPUs and refuses fewer patches than GPUs; stage 2 plans 2 (SAM 2
        # runs once per slice and object), so -num_gpus 3 or more gets one patch per GPU instead of an assertion
        if self.is_ddp and self.configuration_manager.batch_size < dist.get_world_size():
            self.print_to_log_file(f"Stage-2 batch size {self.configuration_manager.batch_size} raised to "
                                   f"{dist.get_world_size()}: one patch per GPU")
            self.configuration_manager.configuration["batch_size"] = dist.get_world_size()
        super()._set_batch_size_and_oversample()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(optimizer_parameter_groups(self.network, self.weight_decay),
                                      lr=self.initial_lr)
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)

    def _build_loss(self):
        settings = SAM2Settings.from_plans(self.configuration_manager.network_arch_init_kwargs)
        return RefinementPassesLoss(super()._build_loss(), settings.presence_loss_weight)

    def train_step(self, batch: dict) -> dict:
        # pass 2's training clicks come from pass 1's errors against the target, which nnU-Net's train_step does
        # not give the network; the network reads it only when its plans ask for click training
        self.network_module.set_click_targets(batch["target"])
        return super().train_step(batch)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # SAM 2 has a single output resolution

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # Training keeps nnU-Net's mirroring (it is free). At test time nnU-Net averages all 2^n flips of the
        # allowed axes, and each flip re-runs SAM 2 on every slice: nnU-Net's three axes would multiply stage 2's
        # time by eight, one in-plane axis (the plans' switch) doubles it. None: nnU-Net's "no mirroring".
        self.inference_allowed_mirroring_axes = stage2_mirror_axes(
            self.configuration_manager.network_arch_init_kwargs, len(self.configuration_manager.patch_size))
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def initialize(self):
        compiles = not self.was_initialized and self._compiles_per_slice_step()
        super().initialize()
        if compiles:
            self.print_to_log_file("Using torch.compile on SAM 2's per-slice modules (not the walk through slices)")
            self.network_module.compile_per_slice_step()
        if os.environ.get(SAM2_CHECKPOINT_VARIABLE):
            # now, not when training starts: nnUNetv2_train's -pretrained_weights compares the network's state dict
            # with the file's key by key, and a stage-2 file references SAM 2's frozen weights (sam2_reference.py)
            self.load_sam2_weights()
        self._weights_at_initialization = weights_fingerprint(self.network_module)

    def weights_replaced_since_initialization(self) -> bool:
        """True after nnUNetv2_train's `-pretrained_weights`, which loads its file between `initialize()` and
        `on_train_start()` without telling the trainer."""
        at_initialization = getattr(self, "_weights_at_initialization", None)
        return at_initialization is not None and weights_fingerprint(self.network_module) != at_initialization

    def load_initial_weights(self):
        """SAM 2's official weights at the start of a training (loaded by `initialize()` where
        RFMEDSAM2_SAM2_CHECKPOINT names them), and nothing over weights that -pretrained_weights brought: SAM 2's
        checkpoint would overwrite their trained decoder heads. A resumed run (`--c`) has its weights from the
        nnU-Net checkpoint and loads nothing."""
        if self.current_epoch > 0:
            return
        if self.weights_replaced_since_initialization():
            self.print_to_log_file("Kept the weights given with -pretrained_weights; SAM 2's checkpoint is not loaded "
                                   "over them")
        elif self.network_module.sam2_reference is None:
            self.load_sam2_weights()

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.check_stage1_predictions()
        self.load_initial_weights()
        trainable, total = self.network_module.parameter_counts()
        self.print_to_log_file(f"RFMedSAM 2 parameters: {trainable:,} trainable of {total:,} "
                               f"({100 * trainable / total:.2f}%)")
        self.log_training_memory_estimate()
        settings = self.network_module.settings
        clicks = settings.train_with_clicks and settings.refinement_passes > 1
        self.print_to_log_file(f"Point prompts in training (pass 2 gets a click at pass 1's errors on each slice): "
                               f"{'on' if clicks else 'off'}")
        dropout = settings.training_prompt_dropout if settings.use_memory else 0.0
        self.print_to_log_file(f"Prompt dropout in training: {dropout:.0%} of slices after the first from memory "
                               f"alone, {dropout:.0%} of the others with a box but no mask")
        super().on_train_start()

    def log_training_memory_estimate(self):
        """The planner's upper bound of a step's GPU memory (planners/training_memory.py), if the plans have one."""
        configuration = self.configuration_manager.configuration
        estimate = configuration.get("training_memory_estimate_gb")
        if estimate:
            target = configuration.get("gpu_memory_target_gb")
            self.print_to_log_file(f"Training memory estimate (upper bound): {estimate['total']} GB, activations "
                                   f"{estimate['activations']} GB; planned for {target} GB")

    def check_stage1_predictions(self):
        folder = self.folder_with_segs_from_previous_stage
        train_keys, val_keys = self.do_split()
        present = {name.split(".")[0] for name in os.listdir(folder)} if os.path.isdir(folder) else set()
        missing = sorted((set(train_keys) | set(val_keys)) - present)
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise StageOnePredictionsMissing(
                f"stage-1 predictions missing in {folder} for {len(missing)} case(s): {shown}. Train stage 1 first "
                f"(nnUNetv2_train DATASET {self.configuration_manager.previous_stage_name} all -tr {STAGE1_TRAINER} "
                f"-p {self.plans_manager.plans_name}, or all five folds): its final validation writes them")
        self.log_stage1_prompt_origin(sorted(set(train_keys) | set(val_keys)))

    def log_stage1_prompt_origin(self, cases):
        """Say whether the stage-1 prompts stage 2 trains on are out of fold or in sample (stage 1's manifest)."""
        from nnunetv2_rfmedsam.trainers.prompt_folds import describe_prompt_origin, summarize_prompt_origin
        folder = self.folder_with_segs_from_previous_stage
        origin = summarize_prompt_origin(folder, cases)
        warning = "WARNING: " if origin["in_sample"] or origin["unknown"] else ""
        self.print_to_log_file(f"{warning}Stage-2 training prompts (stage-1 predictions in {folder}, training and "
                               f"validation cases): {describe_prompt_origin(folder, cases)}")

    def load_sam2_weights(self):
        settings = SAM2Settings.from_plans(self.configuration_manager.network_arch_init_kwargs)
        path = os.environ.get(SAM2_CHECKPOINT_VARIABLE)
        if path:
            self.network_module.load_sam2_checkpoint(path)
            self.print_to_log_file(f"Loaded SAM 2 ({settings.model_size}) weights from {path}")
        elif os.environ.get(ALLOW_RANDOM_INIT_VARIABLE) == "1":
            self.print_to_log_file(f"WARNING: {SAM2_CHECKPOINT_VARIABLE} is not set and "
                                   f"{ALLOW_RANDOM_INIT_VARIABLE}=1: SAM 2 starts from RANDOM weights; results say nothing about RFMedSAM 2's accuracy")
        else:
            raise SAM2CheckpointError(
                f"{SAM2_CHECKPOINT_VARIABLE} is not set: stage 2 fine-tunes SAM 2 and needs the official "
                f"{settings.official_checkpoint_name} (model size {settings.model_size}). {OFFICIAL_CHECKPOINT_HINT}, "
                f"then export {SAM2_CHECKPOINT_VARIABLE}=/path/to/{settings.official_checkpoint_name} "
                f"(or set {ALLOW_RANDOM_INIT_VARIABLE}=1 to train from random weights, for tests only)")
