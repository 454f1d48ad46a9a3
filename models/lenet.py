"""The lottery-ticket papers' MNIST networks: LeNet-300-100 (a multilayer perceptron) and LeNet-5.

LeNet-300-100 (Frankle & Carbin 2019, Table 1): 784-300-100-10 fully connected with ReLU, 266,200
weights; only unstructured masks act on it (filter/channel masks are for convolutions). LeNet-5
(LeCun et al. 1998, with ReLU and max pooling as in current practice): conv 6@5x5 (padding 2) -> pool
-> conv 16@5x5 -> pool -> 120 -> 84 -> classes, 61,470 weights at 28x28. Inputs smaller than 12x12
(the 8x8 Digits) leave no room for the unpadded second conv, so there it is padded too.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model


class LeNet300100(nn.Module):
    def __init__(self, *, num_classes: int, in_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        side = image_size // 2  # conv1 keeps the size (padding 2), then 2x2 pooling
        pad2 = 0 if side >= 6 else 2
        side = (side - 4 + 2 * pad2) // 2
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@register_model("lenet300")
def lenet300(*, num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet300100(num_classes=num_classes, in_features=in_channels * image_size * image_size)


@register_model("lenet5")
def lenet5(*, num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
