"""Train a torchvision classifier on a Hugging Face image dataset.

    accelerate launch train/main.py --arch mobilenet_v2

This file only wires the parts together: config, data, model, loop, metrics,
checkpoint, run folder and report each live in their own module.
"""

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` importable and stop train/ shadowing top-level names
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed  # noqa: E402

from train import report, run_dir  # noqa: E402
from train.checkpoint import cpu_state_dict, load_model, save_model  # noqa: E402
from train.config import Config, parse_config  # noqa: E402
from train.data import load_image_data, make_loader  # noqa: E402
from train.errors import UsageError, report_usage_error  # noqa: E402
from train.loop import TrainState, evaluate, fit  # noqa: E402
from train.metrics import classification_metrics  # noqa: E402
from train.models import build_model, check_arch  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402


def make_accelerator(cfg: Config) -> Accelerator:
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps, step_scheduler_with_optimizer=False)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU (on CPU Accelerate would silently train in fp32); "
                         "use --mixed_precision bf16")
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerator


def resolve_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    # Every rank must agree on one folder, and the default name holds a timestamp.
    name = [cfg.output_dir or run_dir.default_output_dir(cfg.arch + ("-eval" if cfg.eval_only else ""))]
    broadcast_object_list(name)
    cfg.output_dir = name[0]
    path = Path(cfg.output_dir)
    run_dir.refuse_to_overwrite(path)
    accelerator.wait_for_everyone()  # nobody creates files before every rank has checked
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    return path


def train(cfg: Config, accelerator: Accelerator, data, out: Path):
    """Train with validation each epoch; return the model holding the best epoch's weights, and the state."""
    classes = data.class_names
    model = build_model(cfg.arch, len(classes), cfg.pretrained)
    train_loader, val_loader = accelerator.prepare(
        make_loader(data.train, cfg.batch_size, shuffle_seed=cfg.seed, num_workers=cfg.num_workers),
        make_loader(data.val, cfg.eval_batch_size, num_workers=cfg.num_workers))
    steps_per_epoch = -(-len(train_loader) // cfg.grad_accum_steps)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    best = {}

    def on_epoch_end(record, improved):
        if improved:  # every rank keeps the best weights, so the final test needs no shared filesystem
            best["state"] = cpu_state_dict(accelerator.unwrap_model(model))
        if accelerator.is_main_process:
            run_dir.append_metrics(out, record)
            if improved:
                save_model(best["state"], out / run_dir.MODEL, cfg.arch, classes)

    state = TrainState()
    fit(accelerator, model, optimizer, scheduler, train_loader, val_loader, cfg, state, classes, on_epoch_end)
    accelerator.unwrap_model(model).load_state_dict(best["state"])
    return model, state


def load_for_eval(cfg: Config, class_names: list) -> torch.nn.Module:
    path = Path(cfg.checkpoint)
    state_dict, arch, saved_classes = load_model(path / run_dir.MODEL if path.is_dir() else path)
    if saved_classes != class_names:
        raise UsageError(f"{cfg.checkpoint} was trained on classes {saved_classes}, the dataset has {class_names}")
    cfg.arch = arch
    model = build_model(arch, len(class_names))
    model.load_state_dict(state_dict)
    return model


def test_and_report(cfg, accelerator, model, test_loader, state, data, out, started) -> None:
    test = evaluate(accelerator, model, test_loader, cfg.image_size)
    metrics = classification_metrics(test.preds, test.labels, data.class_names)
    if not accelerator.is_main_process:
        return
    trained = bool(state.history)
    summary = {"best_epoch": state.best_epoch if trained else None,
               "best_val_f1_macro": state.best_val_f1_macro if trained else None,
               "test_loss": test.loss, "test_acc": metrics["acc"], "test_f1_macro": metrics["f1_macro"],
               "test_per_class_accuracy": metrics["per_class_accuracy"],
               "confusion_matrix": metrics["confusion_matrix"], "num_test_samples": metrics["num_samples"],
               "epochs_trained": state.epoch, "steps": state.step, "wall_seconds": time.time() - started,
               "world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}
    run_dir.write_summary(out, summary)
    report.write_all(out, cfg.to_dict(), summary, state.history, data.class_names, data.sizes())
    print(f"test accuracy {metrics['acc']:.4f}, macro-F1 {metrics['f1_macro']:.4f}"
          f"{f' (best epoch {state.best_epoch})' if state.best_epoch else ''}; run folder {out}", flush=True)


def run(cfg: Config) -> int:
    started = time.time()
    check_arch(cfg.arch)  # before minutes of data loading
    accelerator = make_accelerator(cfg)
    out = resolve_output_dir(cfg, accelerator)
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # the hub download and Arrow cache are made once per node
        data = load_image_data(cfg)
    if cfg.limit_batches:
        data.limit(cfg.limit_batches, cfg.batch_size, cfg.eval_batch_size, accelerator.num_processes)
    if cfg.eval_only:
        model, state = accelerator.prepare(load_for_eval(cfg, data.class_names)), TrainState()
    if accelerator.is_main_process:
        run_dir.write_config(out, cfg.to_dict(), run_dir.environment(accelerator.num_processes,
                                                                      accelerator.mixed_precision))
    if not cfg.eval_only:
        model, state = train(cfg, accelerator, data, out)
    test_loader = accelerator.prepare(make_loader(data.test, cfg.eval_batch_size, num_workers=cfg.num_workers))
    test_and_report(cfg, accelerator, model, test_loader, state, data, out, started)
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    try:
        return run(parse_config(argv))
    except UsageError as e:
        return report_usage_error(e)


if __name__ == "__main__":
    sys.exit(main())
