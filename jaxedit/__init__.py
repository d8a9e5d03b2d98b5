"""jaxedit: localize, edit, unlearn and attack facts in language models, in JAX."""

from jaxedit.errors import JaxeditError
from jaxedit.interventions import SITES, SiteEdit
from jaxedit.models.config import ModelConfig
from jaxedit.models.core import forward, last_positions
from jaxedit.models.model import Model, export_hf, load, restore_params, save_params
from jaxedit.models.params import init_params

__all__ = [
    "JaxeditError", "SITES", "SiteEdit", "ModelConfig", "forward", "last_positions", "Model",
    "export_hf", "load", "restore_params", "save_params", "init_params",
]
