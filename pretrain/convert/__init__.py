"""Checkpoint conversion: DeepSpeed ZeRO shards, consolidated state dicts, the official InternImage `.pth`,
the HF port's layout, safetensors, and DeepSpeed universal checkpoints (resharding).

`convert(src, dst, to=...)` is `pretrain convert`; `load_pretrained(path, model)` is `model.init_from`.
"""

from .api import FORMATS, LoadReport, Report, backbone_tensors, convert, infer_format, load_pretrained
from .sources import Source, open_source
from .tensors import ConvertError
from .zero import restore_buffers

__all__ = [
    "FORMATS",
    "ConvertError",
    "LoadReport",
    "Report",
    "Source",
    "backbone_tensors",
    "convert",
    "infer_format",
    "load_pretrained",
    "open_source",
    "restore_buffers",
]
