"""Dense counterpart of configs/cnn_fmnist.py."""
from configs import base, cnn_fmnist


def get_config():
  return base.dense(cnn_fmnist.get_config())
