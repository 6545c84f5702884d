"""Dense counterpart of configs/resnet_bs.py."""
from configs import base, resnet_bs


def get_config():
  return base.dense(resnet_bs.get_config())
