import json

from segdist.bench.__main__ import main


def test_bench_data_measures(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "--json",
                "--no-mlflow",
                "--samples",
                "16",
                "--repeats",
                "1",
                "--min-size",
                "32",
                "--max-size",
                "40",
                "--crop",
                "24",
                "--work-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    for key in ("shards_per_s", "folder_per_s", "decode_limit_per_s"):
        assert result[key] > 0
    assert result["samples"] == 16
