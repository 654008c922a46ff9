"""lmforge: build, pretrain, fine-tune, evaluate, compress and serve Transformer language models."""

__version__ = "0.1.0"
