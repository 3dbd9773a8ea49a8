from nnunetv2_rfmedsam.planners.rfmedsam2_planner import RFMedSAM2PlansMixin, nnUNetPlannerRFMedSAM2

__all__ = ["RFMedSAM2PlansMixin", "nnUNetPlannerRFMedSAM2"]
