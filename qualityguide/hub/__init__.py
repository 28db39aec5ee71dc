"""Hub artefacts: the ModelHubMixin of every saved model (:mod:`.mixin`), model cards (:mod:`.cards`) and the training
recipes' ``--push_to_hub`` (:mod:`.push`)."""

from .cards import KINDS, build_model_card, recipe_settings, run_card, scorer_entry, write_model_card
from .mixin import HubModel
from .push import RecipePush, add_hub_arguments, prepare_push

__all__ = ["HubModel", "KINDS", "build_model_card", "write_model_card", "recipe_settings", "run_card", "scorer_entry",
           "RecipePush", "add_hub_arguments", "prepare_push"]
