"""minifilip: a minimal, educational FILIP (Fine-grained Interactive Language-Image Pre-training)."""
