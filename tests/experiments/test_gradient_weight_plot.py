"""The ablation's gradient-weight plot: the mean dL/dr_w and dL/dr_l per cell vs step."""

from __future__ import annotations

from experiments.tables.plots import plot_gradient_weights


def test_gradient_weight_grid_is_written(tmp_path):
    def rows(scale: float) -> list[dict]:
        return [
            {
                "step": step,
                "train/grad_weight_chosen": -scale / step,
                "train/grad_weight_rejected": scale / step,
            }
            for step in range(1, 6)
        ]

    cells = {
        ("logistic", "difference"): [rows(0.05), rows(0.04)],
        ("hinge", "balanced"): [rows(0.1)],
    }
    path = plot_gradient_weights(
        cells, ["logistic", "hinge"], ["difference", "balanced"], tmp_path / "weights.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
