"""Write tests/convert/reference_mage_logits.safetensors: logits of a converted official-layout MAGE.

Run once on the code a refactor starts from (it was run on main at 8e412b6, before the house rebuild);
`test_convert_mage.py::test_logits_equal_the_recorded_reference` rebuilds the same checkpoint from the file's
metadata and asserts that today's code gives the same logits. The checkpoint's values come from a seed, drawn
in sorted key order from the recorded key -> shape list, so they do not depend on the code that reads them.

    python tests/convert/make_reference_logits.py   # from the repository root
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference_mage_logits.safetensors"
SEED = 0


def official_state_dict(shapes: dict[str, list[int]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random official-layout tensors (std 0.3) for `shapes`, drawn in sorted key order; position_ids arange."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shapes[k], generator=g) * 0.3 for k in sorted(shapes) if k != "token_emb.position_ids"}
    if "token_emb.position_ids" in shapes:
        sd["token_emb.position_ids"] = torch.arange(shapes["token_emb.position_ids"][-1])[None]
    return sd


def main() -> None:
    sys.path.insert(0, str(HERE))
    from test_convert_mage import masks, tiny_official_state_dict

    from maskgen.convert.mage import convert_mage
    from maskgen.models import from_pretrained

    shapes = {k: list(v.shape) for k, v in tiny_official_state_dict(dim=16).items()}
    sd = official_state_dict(shapes)
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(1))
    drop, mask = masks(2, 16, 0.75, 8)
    free_mask = masks(2, 16, 0.5, 0, seed=2)[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": sd}, Path(tmp) / "mage.pth")
        model = from_pretrained(convert_mage(Path(tmp) / "mage.pth", Path(tmp) / "out", num_heads=2,
                                             decoder_num_heads=4))
        with torch.no_grad():
            train_logits = model(tokens, mask, drop)
            free_logits = model(tokens, free_mask)[..., :16]
            features = model.forward_features(tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    save_file({"tokens": tokens, "drop_mask": drop, "mask": mask, "free_mask": free_mask,
               "train_logits": train_logits.contiguous(), "free_logits": free_logits.contiguous(),
               "features": features.contiguous()}, str(OUT),
              metadata={"shapes": json.dumps(shapes), "seed": str(SEED), "commit": commit,
                        "heads": "2,4"})
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB) from commit {commit}")


if __name__ == "__main__":
    main()
