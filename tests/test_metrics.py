"""segdist.metrics: confusion matrices (with and without the void-prediction column) and scores."""

import math

import pytest
import torch

from segdist.metrics import confusion_matrix, confusion_matrix_with_void, json_safe, scores


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


def test_prediction_outside_the_classes_is_an_error_not_a_wrong_cell():
    target = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="prediction value 255"):
        confusion_matrix(torch.tensor([[0, 255]]), target, 2)
    with pytest.raises(ValueError, match="label value 7"):
        confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]), 2)


def test_void_predictions_are_false_negatives_and_nobodys_false_positives():
    # gt: 0 0 0 1 | pred: 0 void 1 1 ; a void pred on an ignored pixel counts nowhere
    target = torch.tensor([[0, 0, 0, 1, 255]])
    pred = torch.tensor([[0, 255, 1, 1, 255]])
    conf = confusion_matrix_with_void(pred, target, 2)
    assert conf.tolist() == [[1, 1, 1], [0, 1, 0]]
    result = scores(conf)
    assert math.isclose(result["per_class_iou"][0], 1 / 3)  # tp 1, fn 2 (one void), fp 0
    assert math.isclose(result["per_class_iou"][1], 1 / 2)  # tp 1, fp 1
    assert math.isclose(result["pixel_acc"], 2 / 4)
    assert math.isclose(result["mean_acc"], (1 / 3 + 1) / 2)


def test_void_column_without_void_predictions_scores_like_the_square_matrix():
    torch.manual_seed(0)
    target = torch.randint(0, 4, (3, 9, 9))
    target[0, :2] = 255
    pred = torch.randint(0, 4, (3, 9, 9))
    assert scores(confusion_matrix_with_void(pred, target, 4)) == scores(confusion_matrix(pred, target, 4))


def test_scores_reject_other_shapes_and_empty_matrices_give_nan():
    with pytest.raises(ValueError):
        scores(torch.zeros(3, 5, dtype=torch.int64))
    assert math.isnan(scores(torch.zeros(2, 2, dtype=torch.int64))["miou"])


def test_json_safe_turns_nan_into_null():
    assert json_safe({"a": [1.0, float("nan")], "b": {"c": float("inf")}}) == {"a": [1.0, None], "b": {"c": None}}
