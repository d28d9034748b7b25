"""The distillation methods as recipes over Hugging Face models: one file per method."""
from fastted.methods.base import Recipe, RecipeOutput
from fastted.methods.codir import CoDIR
from fastted.methods.dwt import DWT, Schedule, remap_parameters
from fastted.methods.finetune import FineTune
from fastted.methods.kd import KD
from fastted.methods.lwd import LWD
from fastted.methods.railkd import RAILKD
from fastted.methods.ted import TED, TEDStage1, load_stage1

__all__ = ["CoDIR", "DWT", "FineTune", "KD", "LWD", "RAILKD", "Recipe", "RecipeOutput", "Schedule", "TED", "TEDStage1",
           "load_stage1", "remap_parameters"]
