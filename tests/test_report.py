import math

from segdist.report import ConfigRow, format_markdown


def test_rows_show_mean_std_seeds_and_range():
    row = ConfigRow("abc", "naked train.lr=0.01", values=[0.60, 0.62, 0.64])
    table = format_markdown([row], "val_miou")
    assert "| naked train.lr=0.01 | abc | 62.00 ± 2.00 | 3 | 60.00–64.00 | 0 |" in table


def test_single_seed_has_no_spread_and_failures_are_counted():
    rows = [ConfigRow("a", "x", values=[0.5]), ConfigRow("b", "y", failed=2)]
    table = format_markdown(rows, "val_miou")
    assert "| x | a | 50.00 | 1 | 50.00–50.00 | 0 |" in table
    assert "| y | b | — | 0 | — | 2 |" in table
    assert math.isnan(rows[0].std)
