"""Reference implementation of the Mistral family: the framework-neutral spec and its API."""

from mistral.args import ModelArgs, MoeArgs
from mistral.errors import MistralError
from mistral.model import Model, from_tensors, load

__all__ = ["MistralError", "Model", "ModelArgs", "MoeArgs", "from_tensors", "load"]
