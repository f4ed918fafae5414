"""minifilip: a minimal, educational FILIP (Fine-grained Interactive Language-Image Pre-training)."""
from .config import FILIPConfig
from .model import FILIP
from .tokenizer import WordTokenizer

__all__ = ["FILIP", "FILIPConfig", "WordTokenizer"]
__version__ = "0.1.0"
