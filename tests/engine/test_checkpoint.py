import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from maskgen.engine.checkpoint import load_checkpoint, save_checkpoint
from maskgen.weights import latest_checkpoint, step_dirs
from maskgen.errors import UserError
from maskgen.models.vqgan import VQGAN, VQGANConfig
from maskgen.models import from_pretrained
from maskgen.weights import safe_torch_load

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16, codebook_size=16, norm_groups=8)


def _save(root, step, model, **kw):
    return save_checkpoint(root, step, model, training_state={"optimizer": {"x": torch.ones(2)}},
                           trainer_state={"step": step}, config_yaml="method: tokenizer\n", **kw)


def test_save_load_prune(tmp_path):
    model = VQGAN(VQGANConfig(**TINY))
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, keep_last=2)
    assert [s for s, _ in step_dirs(tmp_path)] == [3, 4]
    weights, state, trainer, ema = load_checkpoint(latest_checkpoint(tmp_path))
    assert trainer == {"step": 4} and ema is None and torch.equal(state["optimizer"]["x"], torch.ones(2))
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    loaded = from_pretrained(tmp_path)  # a checkpoints folder resolves to its latest step
    assert isinstance(loaded, VQGAN)


@pytest.mark.parametrize("where", ["model.safetensors", "os.replace"])
def test_sigkill_while_saving_leaves_previous_checkpoint_usable(tmp_path, where):
    """A process killed (SIGKILL) in the middle of writing step 2 leaves step 1 as the latest usable checkpoint."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        import safetensors.torch as st
        from maskgen.engine import checkpoint as ck
        from maskgen.models.vqgan import VQGAN, VQGANConfig
        model = VQGAN(VQGANConfig(**{TINY!r}))
        kw = dict(training_state={{"optimizer": {{}}}}, trainer_state={{"step": 0}}, config_yaml="")
        ck.save_checkpoint(sys.argv[1], 1, model, **kw)
        def die(*a, **k):
            if {where!r} == "model.safetensors":  # half a file, then death
                open(a[1], "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        if {where!r} == "model.safetensors":
            import maskgen.weights as w; w.save_file = die
        else:
            ck.os.replace = die
        ck.save_checkpoint(sys.argv[1], 2, model, **kw)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "step_00000002.tmp").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    load_checkpoint(latest)
    from_pretrained(latest)
    _save(tmp_path, 3, from_pretrained(latest))  # the next save removes the stale temp folder
    assert not (tmp_path / "step_00000002.tmp").exists()


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refusing to load .*evil.ckpt.*could run arbitrary code"):
        safe_torch_load(tmp_path / "evil.ckpt")
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "ok.ckpt")
    assert safe_torch_load(tmp_path / "ok.ckpt")["epoch"] == 3
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.ckpt"):
        safe_torch_load(tmp_path / "junk.ckpt")
