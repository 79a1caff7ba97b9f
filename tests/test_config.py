import pytest

from maskgen.api import build_config, list_presets, read_preset
from maskgen.errors import ConfigError

from conftest import run_cli


def test_presets_listed_and_build():
    names = list_presets()
    assert {"tokenizer-tiny", "tokenizer-cifar10"} <= set(names)
    for name in names:
        cfg = build_config(read_preset(name)["method"], name)
        assert cfg.train.batch_size >= 1


def test_overrides_are_typed():
    cfg = build_config("tokenizer", "tokenizer-tiny",
                       ["train.max_steps=7", "optim.blr=1e-4", "optim.lr=none", "data.hflip=false",
                        "model.ch_mult=[1,2]", "data.crop_scale=0.3,1.0", "data.path=123"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.blr == pytest.approx(1e-4) and cfg.optim.lr is None
    assert cfg.data.hflip is False and cfg.model.ch_mult == [1, 2]
    assert cfg.data.crop_scale == [0.3, 1.0] and cfg.data.path == "123"


@pytest.mark.parametrize("override, message", [
    ("no_such_key=1", "unknown config key 'no_such_key'"),
    ("train.max_stepz=3", "did you mean 'train.max_steps'"),
    ("trian.epochs=3", "did you mean 'train'"),
    ("train.max_steps=abc", "train.max_steps: expected int"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("train.batch_size=0", "below the minimum"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("data.hflip=maybe", "data.hflip: expected bool"),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale"),
    ("train.ema_decay=1.5", "above the maximum"),
    ("model.ch=30", "norm_groups"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        build_config("tokenizer", "tokenizer-tiny", [override])
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_method_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tokenizer-tiny'"):
        build_config("tokenizer", "tokenizer-tiyn")
    other = tmp_path / "x.yaml"
    other.write_text("method: mage\n")
    with pytest.raises(ConfigError, match="is for method 'mage'"):
        build_config("tokenizer", str(other))


def test_yaml_base_inheritance(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: tokenizer-tiny\ntrain:\n  batch_size: 4\n")
    cfg = build_config("tokenizer", str(f))
    assert cfg.train.batch_size == 4 and cfg.model.codebook_size == 64  # the rest from the base


def test_cli_config_error_is_one_line_exit_2():
    proc = run_cli("train", "tokenizer", "--config", "tokenizer-tiny", "no_such_key=1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["maskgen: error: unknown config key 'no_such_key': keys look like "
                                                "section.key (sections: model, tokenizer, data, optim, schedule, "
                                                "train, dist, log, vis)"]


def test_cli_help_and_config_list():
    top = run_cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "config" in top.stdout
    tr = run_cli("train", "--help")
    assert tr.returncode == 0 and "--resume" in tr.stdout and "tokenizer" in tr.stdout
    lst = run_cli("config", "list")
    assert lst.returncode == 0 and "tokenizer-tiny" in lst.stdout
    show = run_cli("config", "show", "tokenizer-tiny", "train.max_steps=5")
    assert show.returncode == 0 and "max_steps: 5" in show.stdout and "method: tokenizer" in show.stdout


def test_moved_keys_keep_working_with_a_deprecation_note(caplog):
    old = ["data.tokenizer=runs/tok", "data.token_cache=cache.safetensors", "model.mask_ratio_min=0.6",
           "loss.label_smoothing=0.2", "loss.contrastive_weight=0.1", "data.views=2", "log.sample_every=7",
           "loss.sample_images=3", "loss.sample_iters=5", "loss.choice_temperature=2.0"]
    with caplog.at_level("WARNING", logger="maskgen"):
        cfg = build_config("mage", "mage-tiny", old)
    o = cfg.objective
    assert (o.tokenizer, o.token_cache, o.mask_ratio_min, o.label_smoothing, o.contrastive_weight) == \
        ("runs/tok", "cache.safetensors", 0.6, 0.2, 0.1)
    assert (cfg.vis.every, cfg.vis.num_images) == (7, 3)
    assert cfg.vis.sampler == {"num_iter": "5", "choice_temperature": "2.0"}
    assert "config key 'data.tokenizer' is deprecated: use 'mage.tokenizer'" in caplog.text
    assert "'loss.sample_iters' is deprecated: use 'vis.sampler.num_iter'" in caplog.text
    assert build_config("mage", "mage-tiny", ["mage.tokenizer=runs/tok"]).objective.tokenizer == "runs/tok"
    with pytest.raises(ConfigError, match="unknown config key 'mage.tokenzier'"):
        build_config("mage", "mage-tiny", ["mage.tokenzier=x"])
    tok = build_config("tokenizer", "tokenizer-tiny", ["loss.entropy_weight=0.1"])
    assert tok.objective.entropy_weight == 0.1


def test_the_objective_is_not_saved_with_the_weights_and_old_configs_still_load(tmp_path):
    import json

    from maskgen.models import from_pretrained, save_pretrained
    from maskgen.models.mage import MAGE

    cfg = build_config("mage", "mage-tiny")
    out = save_pretrained(MAGE(cfg.model), tmp_path / "mage")
    meta = json.loads((out / "config.json").read_text())
    assert "mask_ratio_min" not in meta["config"] and "label_smoothing" not in meta["config"]
    meta["config"].update(mask_ratio_mu=0.55, mask_ratio_std=0.25, mask_ratio_min=0.5, mask_ratio_max=1.0,
                          label_smoothing=0.1, ratio_per_sample=False)  # a config.json written before the move
    (out / "config.json").write_text(json.dumps(meta))
    assert from_pretrained(out).config == cfg.model
