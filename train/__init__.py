"""Train torchvision classifiers on CIFAR-10-sized Hugging Face datasets with Accelerate.

train/main.py checks the options and hands the run to process (the Accelerator, the run folder, W&B), which
calls runner (what one run does). One module per concern besides:
- options and input: config (the one Config, YAML, --help), archs (torchvision's builder names, without
  importing it), paths (a local --dataset path or a Hub id);
- data: data (datasets, splits, loaders), decode (images to tensors), augment, policies (AutoAugment,
  RandAugment, erasing, batched);
- model and training: models (builders, ModelSpec), optim, loop (train and evaluate), metrics, ema;
- files: model_files (model.safetensors, reading any MODEL), checkpoint (training checkpoints), run_dir (the
  run folder's files), files (atomic writes, strict JSON), report (plots, report.md);
- the run's surroundings: preemption (signals, Ctrl-C), stall (heartbeats, the stall detector and its report),
  progress (the bar and plain lines), tracking (W&B), errors (exit statuses, one-line errors), failpoints (fault
  injection for the tests);
- sweeps: sweep_config (sweep files), study (the Optuna study), sweep (the ask/train/tell worker),
  trial_owner (who runs a trial, orphans taken over), supervise (a trial's and the workers' processes),
  sweep_summary;
  runs_table (one row per run folder, for compare and sweep_summary).
Tools: predict, export, hub (Hub model folders, push), compare, sweep_summary.
"""
