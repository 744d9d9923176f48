"""Self-supervised losses (torch only): DINO, iBOT masked patch tokens, KoLeo."""

from celldino.losses.dino_loss import DINOLoss
from celldino.losses.ibot_loss import iBOTPatchLoss
from celldino.losses.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss"]
