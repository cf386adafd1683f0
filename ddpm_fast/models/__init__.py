from .loading import load_pretrained, save_model
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "load_pretrained", "save_model"]
