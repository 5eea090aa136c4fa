"""Models: dilated ResNet backbones, DeepLab heads and decoders, built from a variant.

    from segdist.models import build_model, param_groups, describe_model
"""

from segdist.models.factory import SegModel, build_model, count_params, describe_model, param_groups
from segdist.models.variant import Variant, parse_variant

__all__ = ["SegModel", "Variant", "build_model", "count_params", "describe_model", "param_groups", "parse_variant"]
