"""Validation Dice: a class absent from the ground truth is left out, never averaged as 0."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from fl_imaging.ml.training import evaluate
from fl_imaging.tools.inference import dice_per_label


class Oracle(nn.Module):
    """Predicts the label map it is given as its input channel (a perfect model)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        onehot = functional.one_hot(x[:, 0].round().long(), self.num_classes)
        return onehot.permute(0, 4, 1, 2, 3).float() * 10.0


def cases(*label_values: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for values in label_values:
        label = torch.zeros(1, 1, 8, 8, 8)
        for i, v in enumerate(values):
            label[0, 0, 2 * i : 2 * i + 2, 2:4, 2:4] = v
        out.append({"image": label.clone(), "label": label})
    return out


def test_a_class_absent_from_every_validation_case_is_nan_and_left_out_of_the_mean() -> None:
    # labels {0, 1, 2, 4} (BraTS 2021 style): class 2 never appears in these cases
    result = evaluate(
        Oracle(5), cases([1, 4], [1]), num_classes=5, roi_size=[8, 8, 8], foreground=[1, 2, 4]
    )
    assert set(result.dice_per_class) == {1, 2, 4}  # no dead channel 3 reported
    assert result.dice_per_class[1] == 1.0 and result.dice_per_class[4] == 1.0
    assert math.isnan(result.dice_per_class[2])
    assert result.dice_mean == 1.0  # MONAI's mean_batch would have made it 2/3


def test_a_class_absent_from_one_case_counts_only_the_cases_that_have_it() -> None:
    # case 1 has class 4, case 2 does not: class 4's Dice is case 1's alone
    result = evaluate(Oracle(5), cases([1, 4], [1]), num_classes=5, roi_size=[8, 8, 8])
    assert result.dice_per_class[4] == 1.0


def test_training_time_dice_and_predict_dice_agree_on_an_absent_class() -> None:
    label = cases([1, 4])[0]["label"][0, 0].numpy().astype(np.int64)
    labels = {0: "bg", 1: "ncr", 2: "ed", 4: "et"}
    offline = dice_per_label(label, label, labels)
    online = evaluate(
        Oracle(5), cases([1, 4]), num_classes=5, roi_size=[8, 8, 8], foreground=[1, 2, 4]
    ).dice_per_class
    assert math.isnan(offline["ed"]) and math.isnan(online[2])
    assert offline["ncr"] == online[1] and offline["et"] == online[4]
