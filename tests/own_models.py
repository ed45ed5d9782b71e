"""A user's own weights folder, made the way the README tells a user to: checkpoints + add-model + add-lineup.

Used by the tests of several weights folders (in-process, live server, container), so each sees
the same folder: a torchvision ResNet-18 and a ResNet-18 + CBAM of the resnet_cbam.py snippet,
both with three classes of the user's own, as the lineup (and pair) ``my-pets``.
"""
from __future__ import annotations

from pathlib import Path

USER_CLASSES = ("cat", "dog", "bird")
USER_LINEUP = "my-pets"


def write_user_folder(folder: str | Path) -> Path:
    """Create ``folder`` with the user's two models, their classes and the lineup; return it."""
    import torch
    import torchvision

    from cbam_viz import cli
    from tests.foreign_models import RefResNet, randomize

    folder = Path(folder)
    sources = folder.parent / f"{folder.name}-checkpoints"
    sources.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (sources / "classes.txt").write_text("\n".join(USER_CLASSES) + "\n")
    torch.save(randomize(torchvision.models.resnet18(num_classes=3), seed=1).state_dict(), sources / "plain.pth")
    snippet = randomize(RefResNet([2, 2, 2, 2], bottleneck=False, style="snippet", num_classes=3), seed=2)
    torch.save({"state_dict": snippet.state_dict(), "epoch": 30}, sources / "cbam.pth")
    for name, file in (("pets_resnet18", "plain.pth"), ("pets_cbam", "cbam.pth")):
        code = cli.main(["add-model", str(sources / file), "--name", name, "--classes", str(sources / "classes.txt"),
                         "--input-size", "64", "--weights", str(folder)])
        assert code == 0, f"add-model {file} failed"
    assert cli.main(["add-lineup", USER_LINEUP, "pets_resnet18", "pets_cbam", "--default",
                     "--weights", str(folder)]) == 0
    return folder
