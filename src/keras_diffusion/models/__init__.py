"""The public model namespace."""

from keras_diffusion.models.backbone import Backbone
from keras_diffusion.models.image_to_image import ImageToImage
from keras_diffusion.models.preprocessor import Preprocessor
from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import CLIPTextEncoder
from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import CLIPTokenizer
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (
    StableDiffusion3Backbone,
)
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_image_to_image import (  # noqa: E501
    StableDiffusion3ImageToImage,
)
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_preprocessor import (
    StableDiffusion3Preprocessor,
)
from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
from keras_diffusion.models.stable_diffusion_3.t5_tokenizer import T5Tokenizer
from keras_diffusion.models.stable_diffusion_3.vae import VAE
from keras_diffusion.models.task import Task
from keras_diffusion.models.tokenizer import Tokenizer

__all__ = [
    "Backbone",
    "CLIPTextEncoder",
    "CLIPTokenizer",
    "ImageToImage",
    "MMDiT",
    "Preprocessor",
    "StableDiffusion3Backbone",
    "StableDiffusion3ImageToImage",
    "StableDiffusion3Preprocessor",
    "T5Encoder",
    "T5Tokenizer",
    "Task",
    "Tokenizer",
    "VAE",
]
