"""internimage-pretrain: distributed pretraining of InternImage backbones."""

__version__ = "0.1.0"
