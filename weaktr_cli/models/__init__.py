"""Models: the WeakTr CAM network, its attention fusion, backbone registry and weight loading.

The retraining segmenter lives in `weaktr_cli.models.segmenter`.
"""

from weaktr_cli.models.cam_vit import CAM_VARIANTS, CamOutputs, WeakTrCAM, cam_loss, cam_maps
from weaktr_cli.models.fusion import FUSIONS
from weaktr_cli.models.reference import convert_reference_state_dict, load_reference_checkpoint
from weaktr_cli.models.registry import ARCHS, ArchSpec, arch_names, build_vit, get_arch
from weaktr_cli.models.weights import LoadReport, load_pretrained_backbone, read_state_dict

__all__ = [
    "ARCHS",
    "CAM_VARIANTS",
    "FUSIONS",
    "ArchSpec",
    "CamOutputs",
    "LoadReport",
    "WeakTrCAM",
    "arch_names",
    "build_vit",
    "cam_loss",
    "cam_maps",
    "convert_reference_state_dict",
    "get_arch",
    "load_pretrained_backbone",
    "load_reference_checkpoint",
    "read_state_dict",
]
