"""CLIP-ViP as a Hugging Face model: config, model, processor, conversion of checkpoints.

Importing it (``import clipvip`` does) registers the classes with transformers' Auto classes,
so ``AutoConfig`` / ``AutoModel`` / ``AutoProcessor.from_pretrained(DIR)`` load a folder written
by ``clipvip convert`` (docs/hf.md).
"""
from transformers import AutoConfig, AutoModel, AutoProcessor

from clipvip.hf.configuration import CLIPViPConfig
from clipvip.hf.hub import push_folder
from clipvip.hf.modeling import CLIPViPModel, CLIPViPOutput
from clipvip.hf.processing import CLIPViPProcessor, VideoInputSettings
from clipvip.weights_ref import is_converted_folder, resolve_folder

AutoConfig.register(CLIPViPConfig.model_type, CLIPViPConfig, exist_ok=True)
AutoModel.register(CLIPViPConfig, CLIPViPModel, exist_ok=True)
AutoProcessor.register(CLIPViPConfig, CLIPViPProcessor, exist_ok=True)

__all__ = [
    "CLIPViPConfig", "CLIPViPModel", "CLIPViPOutput", "CLIPViPProcessor", "VideoInputSettings",
    "is_converted_folder", "push_folder", "resolve_folder",
]
