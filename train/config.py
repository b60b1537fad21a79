"""One config object: dataclass defaults < YAML file (--config) < command line.

The resolved config is written beside the run as config.yaml, so a run can be
repeated with `--config runs/X/config.yaml`.
"""

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from train.errors import UsageError, did_you_mean, first_line


# torch.compile modes whose inductor output replays CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # data
    dataset: str = _opt("uoft-cs/cifar10", "hub id, or a folder that datasets.load_dataset / load_from_disk reads")
    image_column: str = _opt("", "image column (default: the dataset's Image feature)")
    label_column: str = _opt("", "label column (default: the dataset's ClassLabel feature)")
    val_size: float = _opt(0.1, "fraction of `train` held out for validation (stratified); 0 validates on `test`")
    val_images: int = _opt(0, "hold out exactly this many validation images instead of --val-size (0: off)")
    train_images: int = _opt(0, "train on this many of the remaining images (stratified; 0: all)")
    image_size: int = _opt(32, "side of the square network input, in pixels")
    decode_size: int = _opt(0, "side of the decoded images when they are not all one square size: shorter side "
                               "resized, centre-cropped (0: --image-size)")
    gpu_resident: bool = _opt(True, "keep the decoded splits in GPU memory when they fit in half of it "
                                    "(--no-gpu-resident: pinned host memory, copied per batch)")
    skip_bad_images: bool = _opt(False, "leave out rows whose image cannot be decoded (counted in summary.json) "
                                        "instead of stopping")
    num_workers: int = _opt(0, "DataLoader worker processes that cut the batches (0: this process does; the "
                               "batches are slices of the decoded tensors, which workers only copy once more)")
    decode_cache: str = _opt(os.environ.get("CIFAR_ACCELERATE_CACHE", "~/.cache/cifar-accelerate"),
                             "folder of decoded images, keyed by the dataset's fingerprint ('off': decode every run)")
    # model
    arch: str = _opt("mobilenet_v2", "any torchvision classification builder, e.g. mobilenet_v3_large, resnet18")
    pretrained: bool = _opt(False, "start from torchvision's ImageNet weights (downloaded by torchvision)")
    cifar_stem: bool = _opt(False, "adapt ResNets and MobileNets to 32 px inputs (stride-1 stem, see README)")
    compile: bool = _opt(False, "torch.compile the model")
    compile_mode: str = _opt("default", "torch.compile mode with --compile: reduce-overhead captures CUDA graphs "
                             "(one GPU; for small batches, whose steps are launch-bound)",
                             choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    tta: bool = _opt(False, "also report test metrics with horizontal-flip test-time augmentation")
    auto_augment: str = _opt("none", "augmentation policy after crop/flip, drawn per image",
                             choices=("none", "autoaugment", "randaugment"))
    random_erasing: float = _opt(0.0, "probability of random erasing per image (0: off)")
    mixup_alpha: float = _opt(0.0, "MixUp alpha (0: off); with --cutmix-alpha one of the two per batch")
    cutmix_alpha: float = _opt(0.0, "CutMix alpha (0: off)")
    ema_decay: float = _opt(0.0, "keep an EMA of the weights (e.g. 0.999); it is validated, tested and saved")
    sync_bn: bool = _opt(False, "SyncBatchNorm across processes (GPUs only: PyTorch has no CPU SyncBatchNorm)")
    # optimisation
    epochs: int = _opt(30, "training epochs")
    batch_size: int = _opt(128, "training batch size per process")
    eval_batch_size: int = _opt(256, "evaluation batch size per process")
    optimizer: str = _opt("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = _opt(0.05, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "weight decay")
    scheduler: str = _opt("cosine", "learning-rate schedule", choices=("none", "cosine", "step", "onecycle"))
    warmup_epochs: float = _opt(0.0, "linear warmup, in epochs (may be fractional)")
    lr_step_size: int = _opt(0, "--scheduler step: epochs between decays (0: a third of the epochs)")
    lr_gamma: float = _opt(0.1, "--scheduler step: decay factor")
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss")
    grad_accum_steps: int = _opt(1, "batches per optimizer step")
    clip_grad_norm: float = _opt(0.0, "clip the gradient norm to this value (0: off)")
    seed: int = _opt(0, "seed for the split, initialisation, data order and augmentation")
    # run control
    output_dir: str = _opt("", "run folder (default: runs/<arch>-<timestamp>)")
    max_steps: int = _opt(0, "stop after this many optimizer steps in all (0: no limit); for smoke runs")
    limit_batches: int = _opt(0, "use at most this many batches per epoch of every split (0: all); for smoke runs")
    log_every: int = _opt(50, "optimizer steps between logged training losses (W&B; a plain line where no "
                              "terminal shows the live bar, which moves every batch)")
    resume: str = _opt("", "'auto': continue from the newest complete checkpoint in --output-dir (fresh if none); "
                             "or a checkpoint folder")
    checkpoint_every_steps: int = _opt(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    keep_checkpoints: int = _opt(2, "newest checkpoints kept; the best model is kept apart")
    dist_timeout: int = _opt(1800, "seconds a process waits for the others (a first data preparation included) "
                                   "before the run fails")
    stall_timeout: int = _opt(600, "seconds a process may go without progress (a step, a batch of validation; twice "
                                   "that for checkpoint writes, W&B and a phase's first time) before the run stops as "
                                   "stalled, naming that process: stall.json, stacks, exit 124 (0: off; with several "
                                   "processes at most a third of --dist-timeout)")
    wandb: bool = _opt(True, "log to Weights & Biases when wandb is installed (--no-wandb: off, never imported)")
    wandb_mode: str = _opt("", "online, offline or disabled (default: WANDB_MODE / W&B's settings)",
                           choices=("", "online", "offline", "disabled"))
    wandb_project: str = _opt("", "W&B project (default: WANDB_PROJECT, else cifar-accelerate)")
    wandb_entity: str = _opt("", "W&B entity (team or user)")
    wandb_group: str = _opt("", "W&B group (default: sweep-<array job id> under a Slurm array)")
    run_name: str = _opt("", "W&B run name (default: <arch>-lr<lr>-bs<batch>[-job<Slurm job>])")
    tags: str = _opt("", "comma-separated W&B tags")
    wandb_log_model: str = _opt("", "log the model as a W&B artifact (type model): end (once, when the run "
                                    "finishes) or best (a version each time the best epoch improves); off by "
                                    "default, storage costs", choices=("", "end", "best"))
    sweep_dir: str = _opt("", "set by python -m train.sweep: the sweep folder whose study this run reports to")
    trial_number: int = _opt(-1, "set by python -m train.sweep: this run's trial in that study")
    eval_only: bool = _opt(False, "only evaluate --checkpoint on the test split")
    checkpoint: str = _opt("", "with --eval-only: a run folder, model.safetensors, checkpoint folder, Hub model "
                               "folder or hf://REPO_ID[@REVISION]")

    # Options the user gave (command line or --config), as opposed to defaults; not an option itself.
    given: ClassVar[frozenset] = frozenset()

    def validate(self) -> "Config":
        for f in fields(self):  # argparse checks choices on the command line, not in YAML defaults
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{_flag(f.name)} must be one of {', '.join(c for c in choices if c)}, "
                                 f"got '{getattr(self, f.name)}'")
        positive = ("epochs", "batch_size", "eval_batch_size", "lr", "image_size", "grad_accum_steps", "log_every",
                "dist_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        non_negative = ("val_images", "train_images", "decode_size", "num_workers", "max_steps",
                        "checkpoint_every_steps", "limit_batches", "warmup_epochs", "stall_timeout",
                        "weight_decay", "clip_grad_norm", "lr_step_size", "momentum", "mixup_alpha", "cutmix_alpha")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UsageError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_size < 1:
            raise UsageError(f"--val-size must be in [0, 1), got {self.val_size}")
        for name in ("random_erasing", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.compile_mode != "default" and not self.compile:
            raise UsageError(f"--compile-mode {self.compile_mode} needs --compile")
        if self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum_steps > 1:
            # A replay overwrites the graph's outputs, the previous micro-batch's gradients among them
            # (pytorch/pytorch#169545): accumulating them would read overwritten memory.
            raise UsageError(f"--compile-mode {self.compile_mode} (CUDA graphs) cannot accumulate gradients: each "
                             f"replay overwrites the last micro-batch's; use --grad-accum-steps 1 (a larger "
                             f"--batch-size) or --compile-mode default")
        if self.keep_checkpoints < 1:
            raise UsageError(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.resume == "auto" and not self.output_dir:
            raise UsageError("--resume auto needs --output-dir: the run folder to continue")
        if bool(self.sweep_dir) != (self.trial_number >= 0):
            raise UsageError("--sweep-dir and --trial-number go together (python -m train.sweep sets both)")
        if self.eval_only and not self.checkpoint:
            raise UsageError("--eval-only needs --checkpoint PATH (a model.safetensors or a run folder)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --help in sections; every option is in exactly one (tests/test_config.py checks it).
GROUPS = {
    "data": ["dataset", "image_column", "label_column", "val_size", "val_images", "train_images", "image_size",
             "decode_size", "skip_bad_images", "gpu_resident", "num_workers", "decode_cache"],
    "model": ["arch", "pretrained", "cifar_stem", "compile", "compile_mode", "sync_bn"],
    "augmentation": ["auto_augment", "random_erasing", "mixup_alpha", "cutmix_alpha"],
    "optimisation": ["epochs", "batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay",
                     "scheduler", "warmup_epochs", "lr_step_size", "lr_gamma", "label_smoothing", "grad_accum_steps",
                     "clip_grad_norm", "ema_decay", "seed"],
    "evaluation": ["tta", "eval_only", "checkpoint"],
    "run control": ["output_dir", "max_steps", "limit_batches", "log_every", "dist_timeout",
                    "stall_timeout"],
    "checkpoints": ["resume", "checkpoint_every_steps", "keep_checkpoints"],
    "sweep (set by python -m train.sweep)": ["sweep_dir", "trial_number"],
    "tracking (Weights & Biases)": ["wandb", "wandb_mode", "wandb_project", "wandb_entity", "wandb_group", "run_name",
                                    "tags", "wandb_log_model"],
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


# Names Hugging Face's Trainer and timm's train.py give some of these options, to suggest ours for.
KNOWN_AS = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "model": "arch",
            "per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
            "validation_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum_steps",
            "max_grad_norm": "clip_grad_norm", "clip_grad": "clip_grad_norm", "opt": "optimizer",
            "sched": "scheduler", "lr_scheduler_type": "scheduler",
            "smoothing": "label_smoothing", "mixup": "mixup_alpha", "cutmix": "cutmix_alpha",
            "model_ema_decay": "ema_decay", "workers": "num_workers", "dataloader_num_workers": "num_workers",
            "aa": "auto_augment", "reprob": "random_erasing", "img_size": "image_size", "data_dir": "dataset"}


def suggest(name: str, as_flag: bool = False) -> str:
    """'; did you mean X?' for a mistyped option name: a config file's key, or a flag without its --."""
    name, show = name.replace("-", "_"), (lambda option: f"--{_flag(option)}") if as_flag else str
    if name in KNOWN_AS:
        return f"; did you mean {show(KNOWN_AS[name])}?"
    return did_you_mean(name, [f.name for f in fields(Config)], show=show)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        unknown = [arg.split("=")[0][2:] for arg in message.partition("unrecognized arguments:")[2].split()
                   if arg.startswith("--")]
        hint = suggest(unknown[0], as_flag=True) if unknown else ""
        raise UsageError(f"{message}{hint} (see --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default once: not after a help text that says its default itself, nor an empty one."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default in ("", None):
            return action.help
        return super()._get_help_string(action)


EPILOG = ("Mixed precision and the number of processes come from `accelerate launch` (--mixed_precision, "
          "--num_processes, --config_file), not from these options; `python train/main.py` is one process, fp32.")


def build_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """only_given: a parser whose result holds only the options actually on the command line."""
    parser = _Parser(description="Train a torchvision classifier on a Hugging Face image dataset with Accelerate.",
                     epilog=EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--config", default="", help="YAML file of options; the command line overrides it")
    by_name = {f.name: f for f in fields(Config)}
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for f in (by_name[name] for name in names):
            default = argparse.SUPPRESS if only_given else f.default
            _add_option(group, f"--{_flag(f.name)}", f, default, f.metadata["help"])
            if "_" in f.name:  # a W&B sweep agent passes --<parameter>=<value>, named as in the sweep file
                _add_option(group, f"--{f.name}", f, argparse.SUPPRESS, argparse.SUPPRESS)
    return parser


def _add_option(group, flag: str, f, default, help) -> None:
    if f.type is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
    else:
        choices = f.metadata.get("choices")
        if choices and "" in choices:  # "" (unset) is no choice to show: validate() checks these
            choices, metavar = None, "{" + ",".join(c for c in choices if c) + "}"
        else:
            metavar = None
        group.add_argument(flag, dest=f.name, type=f.type, default=default, help=help, choices=choices,
                           metavar=metavar)


def _agent_booleans(argv: list) -> list:
    """`wandb agent` gives a boolean parameter a value (--cifar_stem=True); argparse's switches take none."""
    switches = {f.name for f in fields(Config) if f.type is bool}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        out.append(f"--{'' if _truth(value) else 'no-'}{_flag(name)}" if arg.startswith("--") and eq and
                   name in switches else arg)
    return out


def _truth(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise UsageError(f"expected true or false, got {text!r} (see --help)")


def load_yaml_mapping(path: str, kind: str, holds: str, empty_ok: bool = True) -> dict:
    """The mapping a YAML file (a config file, a sweep file) holds; every problem is one UsageError."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{kind} {path} does not exist")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{kind} {path} is not valid YAML: {first_line(e)}") from None
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{kind} {path} must hold a mapping ({holds})")
    return raw


def load_yaml_options(path: str) -> dict:
    """Read a config file into {field name: value}, refusing unknown keys and wrong types."""
    raw = load_yaml_mapping(path, "config file", "option: value")
    types = {f.name: f.type for f in fields(Config)}
    options = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "environment":  # versions recorded in a run's config.yaml, not options
            continue
        if name not in types:
            raise UsageError(f"config file {path}: unknown key '{key}'{suggest(name)}")
        options[name] = _coerce(path, key, value, types[name])
    return options


def _coerce(path, key, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and value is None:
        return ""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"config file {path}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def parse_config(argv=None) -> Config:
    argv = _agent_booleans(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    from_file = load_yaml_options(known.config) if known.config else {}
    parser.set_defaults(**from_file)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    cfg = Config(**args).validate()
    given = set(vars(build_parser(only_given=True).parse_args(argv))) - {"config"}
    cfg.given = frozenset(given | set(from_file))
    return cfg
