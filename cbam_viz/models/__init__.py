"""Model architectures: torchvision-compatible ResNets and their CBAM twins."""
from . import resnet as _resnet  # noqa: F401  (registers the builders)
from ._registry import backbone_of, build_model, is_model, list_models, register_model
from .cbam import CBAM, OFFICIAL, SIMPLIFIED, CBAMConfig, ChannelGate, SpatialGate
from .factory import create_model
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock", "backbone_of", "Bottleneck", "build_model", "CBAM", "CBAMConfig", "ChannelGate", "OFFICIAL", "ResNet",
    "SIMPLIFIED", "SpatialGate", "create_model", "is_model", "list_models", "register_model",
]
