"""The public model namespace."""

from keras_diffusion.models.backbone import Backbone
from keras_diffusion.models.image_to_image import ImageToImage
from keras_diffusion.models.preprocessor import Preprocessor
from keras_diffusion.models.task import Task
from keras_diffusion.models.tokenizer import Tokenizer

__all__ = ["Backbone", "ImageToImage", "Preprocessor", "Task", "Tokenizer"]
