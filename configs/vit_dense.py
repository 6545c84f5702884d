"""Dense counterpart of configs/vit_bs.py."""
from configs import base, vit_bs


def get_config():
  return base.dense(vit_bs.get_config())
