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


def test_an_interval_of_two_seeds_is_clipped_to_0_100_and_flagged():
    header, body = table_rows([ConfigRow("a", "x", values=[0.30, 0.60])], "final_miou", None)
    ci = body[0][header.index("95% CI (%)")]
    assert ci == "0.00–100.00 (n=2: too few seeds)"  # t(0.975, 1) = 12.7: mean ± 135 points
    header, body = table_rows([ConfigRow("a", "x", values=[0.60, 0.61, 0.62])], "final_miou", None)
    assert body[0][header.index("95% CI (%)")] == "58.52–63.48"


def record_study(client, name: str, baseline: str | None, values: dict[str, list[float]]) -> str:
    """A study as segdist.tune records it: a parent run, one finished child run per seed."""
    from segdist.mlflow_store import PARENT_TAG, ROLE_TAG, STATUS_TAG, STUDY_TAG, get_or_create_experiment

    experiment_id = get_or_create_experiment(client, name, "sqlite://")
    parent = client.create_run(experiment_id, tags={ROLE_TAG: "study", STUDY_TAG: name}).info.run_id
    client.log_param(parent, "study.baseline", baseline or "")
    for variant, seeds in values.items():
        for seed, value in enumerate(seeds):
            run = client.create_run(experiment_id, tags={PARENT_TAG: parent, ROLE_TAG: "trial", STATUS_TAG: "finished"})
            for key, param in {"config_id": variant, "model.variant": variant, "overrides": "",
                               "train.seed": seed}.items():
                client.log_param(run.info.run_id, key, param)
            client.log_metric(run.info.run_id, "final_miou", value)
            client.set_terminated(run.info.run_id)
    return parent


def test_report_with_no_arguments_reports_the_latest_study_against_its_own_baseline(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from segdist.mlflow_store import EXPERIMENT_KIND_TAG, MODEL_TRAINING
    from segdist.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    record_study(client, "older", None, {"naked": [0.5, 0.6]})
    latest = record_study(client, "newer", "naked", {"naked": [0.60, 0.62, 0.61], "naked.sobel": [0.64, 0.65, 0.66]})
    assert client.get_experiment_by_name("newer").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING

    assert main(["--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    assert f"study 'newer' (run {latest})" in err and "baseline naked" in err
    assert out.startswith("| configuration |") and "Δ vs naked (p, Welch)" in out
    assert "| naked.sobel | naked.sobel | 3 | 65.00 ± 1.00 |" in out and "| naked | naked | 3 |" in out


def test_report_of_an_unknown_experiment_lists_the_studies_of_the_store(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from segdist.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_study(MlflowClient(uri), "quickstart", None, {"naked": [0.5]})
    assert main(["--tracking-uri", uri, "--experiment", "quikstart"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "segdist" in line]
    assert errors == [f"segdist: error: no MLflow experiment named 'quikstart' in {uri}; its studies: quickstart"]
