from segdist.evaluation.text import format_summary


def test_report_has_headline_classes_boundary_and_no_crf_lines():
    part = {"miou": 0.5, "pixel_acc": float("nan"), "mean_acc": None}
    summary = {"num_images": 3, "miou": 0.25, "pixel_acc": 0.5, "mean_acc": 0.125,
               "per_class_iou": {"background": 0.5, "disc": float("nan")},
               "without_crf": part, "boundary": {"11": {"boundary": part, "inner": part}}}
    lines = format_summary(summary).splitlines()
    assert lines[0] == "images 3   mIoU 25.00   pixel acc 50.00   mean acc 12.50"
    assert lines[1] == "without CRF:   mIoU 50.00   pixel acc   n/a   mean acc   n/a"
    assert lines[3:5] == ["  background       50.00", "  disc               n/a"]
    assert lines[-1].startswith("  K=11  boundary 50.00   n/a   n/a   inner 50.00")
