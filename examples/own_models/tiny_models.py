"""Your own student: any ``nn.Module`` whose forward returns logits.

kdsearch calls ``small_cnn(num_classes=N)`` (the spec ``tiny_models:small_cnn``) and distils
the outputs of the modules named in ``student_stages`` (here ``block1..block3``).
"""

from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv blocks, each halving the resolution after the first, then a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.block1 = _block(3, width)
        self.block2 = nn.Sequential(nn.MaxPool2d(2), _block(width, 2 * width))
        self.block3 = nn.Sequential(nn.MaxPool2d(2), _block(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.head(x.mean((2, 3)))


def small_cnn(num_classes: int) -> nn.Module:
    return SmallCNN(num_classes)
