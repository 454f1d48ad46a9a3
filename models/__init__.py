"""Plain dense architectures by name; see ``models.registry``.

Importing the family modules fills the registry. Lower-case ``resnet18`` etc. are the CIFAR-style
networks of the HYDRA/BiP code; capitalised ``ResNet18`` etc. are the ImageNet (torchvision) ones;
``mobilenet`` / ``mobilenet_cifar`` are the WoodFisher paper's MobileNetV1; ``tv.<name>`` is any
torchvision classification model (``models.torchvision_zoo``).
"""

from models import lenet, mobilenet, resnet_cifar, resnet_imagenet, resnet_s, smallcnn, vgg, wrn  # noqa: F401  (registration)
from models.registry import MODELS, build_model, model_names, register_model

__all__ = ["MODELS", "build_model", "model_names", "register_model"]
