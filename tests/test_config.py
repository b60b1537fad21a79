import pytest

from train.config import parse_config
from train.errors import UsageError


def test_defaults_yaml_and_command_line_in_that_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("arch: resnet18\nlr: 1\nbatch-size: 64\nscheduler: step\n")
    cfg = parse_config(["--config", str(file), "--batch-size", "8"])
    assert cfg.arch == "resnet18"  # from the file
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # YAML int accepted for a float option
    assert cfg.batch_size == 8  # the command line wins
    assert cfg.epochs == 30  # default


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("epochs: ten\n", "'epochs' must be int"),
    ("scheduler: linear\n", "--scheduler must be one of"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_bad_config_files(tmp_path, text, message):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(file)])


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--val-size", "1"], r"--val-size must be in \[0, 1\)"),
    (["--val-size", "-0.1"], r"--val-size must be in \[0, 1\)"),
    (["--optimizer", "lamb"], "invalid choice"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--config", "missing.yaml"], "does not exist"),
])
def test_bad_options(args, message):
    with pytest.raises(UsageError, match=message):
        parse_config(args)


def test_help_lists_every_option_once_in_its_section():
    from dataclasses import fields

    from train.config import GROUPS, Config, build_parser

    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(Config))  # each exactly once
    text = build_parser().format_help()
    for title in GROUPS:
        assert f"\n{title}:\n" in text
    augmentation = text.split("\naugmentation:\n")[1].split("\noptimisation:\n")[0]
    assert "--mixup-alpha" in augmentation and "--ema-decay" not in augmentation


def test_options_as_a_wandb_agent_passes_them():
    """`wandb agent` runs the program with --<parameter>=<value>, named as in the sweep file (batch_size)."""
    cfg = parse_config(["--batch_size=64", "--lr=0.01", "--auto_augment=randaugment", "--no-gpu_resident",
                        "--epochs=2"])
    assert (cfg.batch_size, cfg.lr, cfg.auto_augment, cfg.gpu_resident, cfg.epochs) == (64, 0.01, "randaugment",
                                                                                          False, 2)
    assert {"batch_size", "lr", "auto_augment", "gpu_resident", "epochs"} <= cfg.given
    cfg = parse_config(["--cifar_stem=True", "--compile=false", "--tta=True", "--gpu_resident=False"])
    assert (cfg.cifar_stem, cfg.compile, cfg.tta, cfg.gpu_resident) == (True, False, True, False)
    assert parse_config(["--tta", "--no-compile"]).tta and not parse_config(["--no-compile"]).compile
    with pytest.raises(UsageError, match="expected true or false, got 'maybe'"):
        parse_config(["--tta=maybe"])
