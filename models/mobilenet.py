"""MobileNetV1 (Howard et al. 2017), width 1.0: the WoodFisher paper's second ImageNet network.

The layout and the state-dict names are those of the WoodFisher code's ``MobileNet`` (its
``configs/mobilenetv1.yaml`` lists the pruned modules by these names, and its dense STR checkpoint
loads here): ``model.0`` = conv 3x3/2 (3 -> 32) + BN + ReLU; ``model.1`` ... ``model.13`` = a
depthwise 3x3 conv (``.0``, groups = its channels) + BN + ReLU and a pointwise 1x1 conv (``.3``)
+ BN + ReLU; ``model.14`` = the average pool; ``fc`` = Linear(1024, classes). Convolutions have no
bias. The pool is adaptive (WoodFisher's AvgPool2d(7) is the same thing at 224x224), so any image
size that survives the five stride-2 stages works.

``mobilenet`` is the ImageNet network (stem stride 2: 224 -> 7x7 before the pool);
``mobilenet_cifar`` has a stride-1 stem, the usual CIFAR-size variant (32 -> 2x2), with the same
names and weights.
"""

import torch
from torch import nn

from models.registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks, after a 32-channel stem.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1)]
STEM = 32


def _conv_bn_relu(n_in: int, n_out: int, kernel: int, *, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(n_in, n_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(n_out), nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, stem_stride: int = 2) -> None:
        super().__init__()
        stages: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(in_channels, STEM, 3, stride=stem_stride))]
        width = STEM
        for out, stride in BLOCKS:
            stages.append(nn.Sequential(*_conv_bn_relu(width, width, 3, stride=stride, groups=width),  # depthwise
                                        *_conv_bn_relu(width, out, 1)))  # pointwise
            width = out
        stages.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*stages)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():  # torchvision's MobileNetV2 init (the WoodFisher code keeps PyTorch's default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.model(x).flatten(1))


@register_model("mobilenet")
def mobilenet(*, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, stem_stride=2)


@register_model("mobilenet_cifar")
def mobilenet_cifar(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, stem_stride=1)
