"""Networks, registered by name in :data:`dltemplate.registry.MODELS`."""

from dltemplate.models import cnn, mlp  # noqa: F401  (registers the models)
