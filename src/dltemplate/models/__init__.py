"""Networks, registered by name in :data:`dltemplate.registry.MODELS`."""

from dltemplate.models import cnn, mlp, unet  # noqa: F401  (registers the models)
