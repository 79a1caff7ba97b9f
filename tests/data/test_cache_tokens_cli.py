"""`maskgen cache-tokens` end to end through the command line."""
import torch

from maskgen.data.token_cache import TokenCache, tokenizer_hash
from maskgen.models.vqgan import VQGAN, VQGANConfig
from maskgen.models import save_pretrained

from conftest import make_folder, run_cli


def test_cache_tokens_cli(tmp_path):
    torch.manual_seed(0)
    tok = VQGAN(VQGANConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16, codebook_size=16, norm_groups=8))
    save_pretrained(tok, tmp_path / "tok")
    data = make_folder(tmp_path / "imgs", 12)
    out = tmp_path / "cache.safetensors"
    proc = run_cli("cache-tokens", "--tokenizer", tmp_path / "tok", "--data", data, "--out", out, "--views", 3,
                   "--image-size", 16, check=True)
    assert "wrote" in proc.stdout
    cache = TokenCache(out)
    assert len(cache) == 12 and cache.views == 3 and cache.grid == (8, 8)
    assert cache.tokenizer_hash == tokenizer_hash(tok)
    bad = run_cli("cache-tokens", "--tokenizer", tmp_path / "tok", "--data", data, "--out", out, "--views", 3,
                  "--image-size", 15)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
