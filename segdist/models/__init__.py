"""Models: ResNet backbones, DeepLab classifiers, FPN/GCN decoders and edge/Sobel modules,
built from a recipe's model part (segdist.recipe.ModelRecipe).

    from segdist.models import build_model, parameter_groups, describe_model
"""

from segdist.models.factory import (
    SegModel,
    build_model,
    count_params,
    describe_model,
    describe_recipe,
    parameter_groups,
)
from segdist.models.variant import Variant, parse_variant

__all__ = ["SegModel", "Variant", "build_model", "count_params", "describe_model", "describe_recipe",
           "parameter_groups", "parse_variant"]
