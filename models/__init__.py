"""Plain dense architectures by name; see ``models.registry``.

Importing the family modules fills the registry. Lower-case ``resnet18`` etc. are the CIFAR-style
networks of the HYDRA/BiP code; capitalised ``ResNet18`` etc. are the ImageNet (torchvision) ones.
"""

from models import lenet, resnet_cifar, resnet_imagenet, resnet_s, smallcnn, vgg, wrn  # noqa: F401  (registration)
from models.registry import MODELS, build_model, model_names, register_model

__all__ = ["MODELS", "build_model", "model_names", "register_model"]
