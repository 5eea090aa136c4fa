import math

import torch

from segdist.metrics import confusion_matrix, scores


def test_confusion_matrix_skips_ignored_pixels():
    target = torch.tensor([[0, 1], [255, 1]])
    pred = torch.tensor([[0, 0], [1, 1]])
    conf = confusion_matrix(pred, target, num_classes=2)
    assert conf.tolist() == [[1, 0], [1, 1]]


def test_scores_by_hand():
    # gt 0: 3 px (2 right), gt 1: 1 px (right); pred 1 once wrongly.
    conf = torch.tensor([[2, 1], [0, 1]])
    result = scores(conf)
    assert math.isclose(result["per_class_iou"][0], 2 / 3)
    assert math.isclose(result["per_class_iou"][1], 1 / 2)
    assert math.isclose(result["miou"], (2 / 3 + 1 / 2) / 2)
    assert math.isclose(result["pixel_acc"], 3 / 4)
    assert math.isclose(result["mean_acc"], (2 / 3 + 1) / 2)


def test_class_absent_everywhere_is_left_out_of_the_mean():
    conf = torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    result = scores(conf)
    assert math.isnan(result["per_class_iou"][2])
    assert result["miou"] == 1.0


def test_confusion_matrices_add_up_like_one_pass():
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16))
    pred = torch.randint(0, 4, (2, 16, 16))
    whole = confusion_matrix(pred, target, 4)
    halves = confusion_matrix(pred[:1], target[:1], 4) + confusion_matrix(pred[1:], target[1:], 4)
    assert torch.equal(whole, halves)
