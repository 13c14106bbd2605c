import dataclasses

import pytest

from graycnn.study import baselines
from graycnn.training import checkpoint, data, evaluation, train

pytestmark = pytest.mark.slow  # every baseline row trained end to end


def test_every_row_end_to_end_on_a_tiny_model(tmp_path, sample_npz):
    base = dataclasses.replace(train.TrainConfig(), dataset=f"npz:{sample_npz}", epochs=1)
    report = baselines.run_baselines(["densenet_test"], str(tmp_path), base, bn="recalibrate")
    assert [r["row"] for r in report["rows"]] == list(baselines.ROWS)
    val = data.load_dataset(base.dataset, "validation")
    for row in report["rows"]:
        model_config, variables, _ = checkpoint.load_model(row["checkpoint"])
        assert model_config.in_channels == (1 if row["view"] == "gray" else 3)
        result = evaluation.evaluate(model_config, variables, val, row["view"])
        assert result["accuracy"] == pytest.approx(row["accuracy"], abs=1e-9), row["row"]
    trained = [r for r in report["rows"] if r["row"] != "gray_folded_bn"]
    assert all(len(r["history"]) == 1 for r in trained)
    gray = {r["row"]: r["params"] for r in report["rows"]}
    # Folding the stem to 1 channel removes 2/3 of its kernel: 3*3*2*8 parameters.
    assert gray["color_scratch"] - gray["gray_folded_finetuned"] == 3 * 3 * 2 * 8
    assert (tmp_path / "report.md").read_text().count("| densenet_test |") == 5
    assert (tmp_path / "accuracy_densenet_test.png").stat().st_size > 1000
