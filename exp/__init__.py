"""exp: a Hydra-composed experiment framework for training language models."""

from exp import resolvers as _resolvers

_resolvers.register()
