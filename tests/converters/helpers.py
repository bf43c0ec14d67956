"""torch models the converter tests share: torchvision nets and a hand-written ResNet-20."""

import torch
import torchvision
from torch import nn

from converters import randomize_batch_norm

# Relative to the largest |logit|; the acceptance bound. Never relax it.
TOLERANCE = 1e-4


def torchvision_model(arch, num_classes=1000, seed=0):
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return randomize_batch_norm(net, seed).eval()


class TorchResNet20(nn.Module):
    """ResNet-20 for CIFAR written out by hand, independent of the converter's mirror.

    3x3 stride-1 stem (reading ``in_channels``: 3 for RGB, 1 for grey) without max-pool; three stages of three basic blocks of
    widths w, 2w, 4w; a 1x1 conv + BN shortcut where stride or width changes.
    """

    # The stages, set by name in __init__.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    def __init__(self, num_classes=10, width=16, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for s, stride in enumerate((1, 2, 2)):
            cout = width * 2**s
            blocks = [
                self.Block(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(3)
            ]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def resnet20_torch(num_classes=10, width=16, seed=0, in_channels=3):
    torch.manual_seed(seed)
    return randomize_batch_norm(TorchResNet20(num_classes, width, in_channels), seed).eval()
