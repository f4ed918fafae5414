"""minifilip: a minimal, educational FILIP (Fine-grained Interactive Language-Image Pre-training).

One import gives the paper's pieces:

    from minifilip import FILIP, FILIPConfig, WordTokenizer, late_interaction, select_tokens, info_nce
"""
from .checkpoint import load_model, save_checkpoint
from .cmli import late_interaction, late_interaction_reference, select_tokens
from .config import FILIPConfig
from .data import builtin_val_pairs, render_scene
from .gradcache import cached_backward
from .loss import info_nce
from .model import FILIP
from .tokenizer import WordTokenizer

__all__ = ["FILIP", "FILIPConfig", "WordTokenizer", "late_interaction", "late_interaction_reference",
           "select_tokens", "info_nce", "cached_backward", "load_model", "save_checkpoint", "render_scene",
           "builtin_val_pairs"]
__version__ = "0.1.0"
