"""Models: ResNet backbones, DeepLab classifiers, FPN/GCN decoders and edge/Sobel modules,
built from a recipe's model part (segdist.recipe.ModelRecipe).

    from segdist.models import build_model, parameter_groups, describe_model

A trained model back from its checkpoint (the model rebuilt from the checkpoint's own
recipe, weights loaded, eval mode):

    from segdist.models import load_model
    trained = load_model("best_checkpoint/checkpoint.pt", device="cpu")  # or the folder
    trained.model, trained.classes, trained.trial.recipe
"""

from segdist.evaluation.checkpoint import TrainedModel, load_model
from segdist.models.factory import (
    SegModel,
    build_model,
    count_params,
    describe_model,
    describe_recipe,
    parameter_groups,
)
from segdist.models.variant import Variant, parse_variant

__all__ = ["SegModel", "TrainedModel", "Variant", "build_model", "count_params", "describe_model", "describe_recipe",
           "load_model", "parameter_groups", "parse_variant"]
