"""Run by tests under torchrun: train a tiny tokenizer, then every rank saves its final weights."""
import sys
from pathlib import Path

from safetensors.torch import save_file

from maskgen.api import build_config
from maskgen import distributed as dist
from maskgen.engine.trainer import Trainer

out, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = build_config("tokenizer", "tokenizer-tiny", overrides)
rank, local_rank, _ = dist.env_world()
device = dist.resolve_device("cpu", local_rank)
dist.init(device, "gloo", 120)
trainer = Trainer(cfg, device, out / "run", None)
trainer.run()
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
dist.cleanup()
