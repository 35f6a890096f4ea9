"""Time-step-aware calibration data captured from the full-precision sampler."""
from diffquant.calibration.capture import CalibrationSet, capture_calibration_set, cm_chain_levels, step_indices

__all__ = ["CalibrationSet", "capture_calibration_set", "cm_chain_levels", "step_indices"]
