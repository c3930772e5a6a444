"""`python -m losses`: a short tour of the zoo on one batch of made-up log-probs."""

from __future__ import annotations

import torch

from losses import LOSSES, MARGINS, METHODS, preference_loss


def main() -> None:
    """Print every loss x margin cell, and every named method, on the same four pairs."""
    # four pairs: chosen far up & rejected far down; both down (DCR); both up;
    # chosen down & rejected up
    policy_chosen = torch.tensor([3.0, -14.0, -8.0, -13.0])
    policy_rejected = torch.tensor([-32.0, -20.0, -9.0, -10.0])
    ref_chosen = torch.tensor([-12.0, -12.0, -12.0, -12.0])
    ref_rejected = torch.tensor([-12.0, -12.0, -12.0, -12.0])
    print(
        "pairs: r_w =",
        (policy_chosen - ref_chosen).tolist(),
        " r_l =",
        (policy_rejected - ref_rejected).tolist(),
        " beta = 0.1, alpha = 0.3\n",
    )
    header = f"{'loss':<22}" + "".join(f"{m:>34}" for m in MARGINS)
    print(header)
    for loss in LOSSES:
        cells = []
        for margin in MARGINS:
            out = preference_loss(
                policy_chosen,
                policy_rejected,
                ref_chosen,
                ref_rejected,
                loss=loss,
                margin=margin,
                beta=0.1,
                alpha=0.3,
            )
            cells.append(" ".join(f"{v:7.3f}" for v in out.losses.tolist()))
        print(f"{loss:<22}" + "".join(f"{c:>34}" for c in cells))
    print(
        "\nnamed methods (per-pair loss; where a method needs them: chosen NLL 1.0, scores 4 and "
        "1, mismatched-pair log-ratios -1; kto's z0 = 0):"
    )
    extras = {
        "policy_chosen_nll": torch.ones(4),
        "score_chosen": torch.full((4,), 4.0),
        "score_rejected": torch.ones(4),
        "kl_logratios": torch.full((4,), -1.0),
    }
    for name, method in METHODS.items():
        out = method(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **extras)
        values = " ".join(f"{v:8.3f}" for v in out.losses.tolist())
        print(f"  {name:<13} {values}   {method.paper}")


if __name__ == "__main__":
    main()
