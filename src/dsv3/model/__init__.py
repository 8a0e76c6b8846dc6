"""The DeepSeek-V3 model (single device): MLA, DeepSeekMoE, MTP."""
from dsv3.model.model import DeepseekV3, ModelOutput, lm_loss, mtp_shift

__all__ = ["DeepseekV3", "ModelOutput", "lm_loss", "mtp_shift"]
