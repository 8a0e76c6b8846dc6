"""dsv3: train DeepSeek-V3-architecture language models, readable end to end."""

__version__ = "0.1.0"
