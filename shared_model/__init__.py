"""UNet-MoE-Cli core: model, loss, parameter groups, configs and metric maths.

Never imports Flower, so it is usable and testable without a federation.
"""

from shared_model.clinical import CLINICAL_DIM, REGIMENS, encode_clinical
from shared_model.errors import ConfigError, DataError, MoeflError
from shared_model.loss import LossConfig, MoELoss
from shared_model.model import ModelOutput, UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.parameter_groups import parameter_groups
from shared_model.plan import Plan

__all__ = [
    "CLINICAL_DIM",
    "REGIMENS",
    "ConfigError",
    "DataError",
    "LossConfig",
    "MoELoss",
    "ModelConfig",
    "ModelOutput",
    "MoeflError",
    "Plan",
    "UNetMoECli",
    "build_model",
    "encode_clinical",
    "parameter_groups",
]
