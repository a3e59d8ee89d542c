"""The simulated NSD: procedural scenes, a CLIP-free voxel encoding model, official file formats."""

from .presets import PRESETS, SimulationPreset, list_presets, load_preset
from .simulate import SimulatedNSD, load_truth, make_synthetic_nsd, simulation_dir, truth_path

__all__ = [
           "PRESETS",
           "SimulatedNSD",
           "SimulationPreset",
           "list_presets",
           "load_preset",
           "load_truth",
           "make_synthetic_nsd",
           "simulation_dir",
           "truth_path",
]
