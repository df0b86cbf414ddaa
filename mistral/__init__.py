"""Reference implementation of the Mistral family: the framework-neutral spec and its API."""

__version__ = "0.2.0"

from mistral.api import Model, from_tensors, load
from mistral.args import ModelArgs, MoeArgs
from mistral.errors import MistralError
from mistral.tokenizer import Tokenizer

__all__ = [
    "MistralError",
    "Model",
    "ModelArgs",
    "MoeArgs",
    "Tokenizer",
    "__version__",
    "from_tensors",
    "load",
]
