from segdist.report import ConfigRow, format_table, seeds_figure, table_rows


def test_rows_show_mean_std_ci_range_and_welch_against_the_baseline():
    base = ConfigRow("b", "naked", "naked", values=[0.683, 0.654, 0.668])
    other = ConfigRow("s", "naked.sobel", "naked.sobel", values=[0.682, 0.684])
    header, body = table_rows([other, base], "val_miou", base)
    table = format_table(header, body, "md")
    assert "Δ vs naked (p, Welch)" in table
    assert "| naked | b | 3 | 66.83 ± 1.45 | 63.23–70.44 | 65.40–68.30 | baseline |" in table
    assert "| naked.sobel | s | 2 | 68.30 ± 0.14 |" in table and "+1.47 (p=0.221)" in table


def test_single_seed_and_unfinished_trials():
    rows = [ConfigRow("a", "x", values=[0.5]), ConfigRow("b", "y", not_finished={"diverged": 2})]
    header, body = table_rows(rows, "val_miou", None)
    table = format_table(header, body, "md")
    assert "| x | a | 1 | 50.00 | — | 50.00–50.00 | 0 |" in table
    assert "| y | b | 0 | — | — | — | 2 diverged |" in table


def test_boundary_columns_appear_when_measured_and_csv_works():
    row = ConfigRow("a", "spk", values=[0.6, 0.62], extra={"final_boundary11_miou": [0.58, 0.59],
                                                           "final_inner11_miou": [0.68, 0.69]})
    header, body = table_rows([row], "val_miou", None)
    assert "final_boundary11_miou (%)" in header and "final_inner11_miou (%)" in header
    csv_text = format_table(header, body, "csv")
    assert csv_text.splitlines()[1].startswith("spk,a,2,61.00 ± 1.41")


def test_seed_figure_is_a_png():
    assert seeds_figure([ConfigRow("a", "x", values=[0.5, 0.6])], "val_miou")[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_name_the_variant_once_and_the_searched_values():
    from segdist.report import config_label

    assert config_label({"model.variant": "naked.fpn", "overrides": "model.variant=naked.fpn train.lr=0.01"}) \
        == "naked.fpn train.lr=0.01"
    assert config_label({"model.variant": "naked", "overrides": ""}) == "naked"


def test_the_decision_says_which_seed_replaced_a_failed_one():
    from segdist.report import decision_text

    decided = {"stop_reason": "95% CI half-width 0.50 <= 1", "replaced_seeds": {"1": 3}}
    assert decision_text(decided) == "95% CI half-width 0.50 <= 1; failed seed 1 replaced by seed 3"
    assert decision_text({"stop_reason": "fixed seeds"}) == "fixed seeds"
    assert decision_text({}) == ""
