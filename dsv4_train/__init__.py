"""dsv4-train: pre-train and fine-tune DeepSeek-V4 on Megatron-Core, configured with Hydra."""

__version__ = "0.1.0"
