"""A teacher trained by a plain PyTorch loop (no kdsearch), saved as ``{"model": state_dict}``.

    python examples/own_models/train_teacher.py DATA_DIR teacher.pt [--epochs 3] [--lr 0.01]

DATA_DIR is an ImageFolder tree (``DATA_DIR/train/<class>/*.png``). The images are
normalised with MEAN and STD, the same numbers the study config gives kdsearch: a checkpoint
expects the preprocessing it was trained with.
"""

import argparse

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(MEAN, STD)])
    train = torchvision.datasets.ImageFolder(f"{args.data}/train", transform=transform)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    model = torchvision.models.resnet18(num_classes=len(train.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")
    torch.save({"model": model.state_dict(), "epochs": args.epochs}, args.out)


if __name__ == "__main__":
    main()
