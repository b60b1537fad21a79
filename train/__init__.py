"""Train torchvision classifiers on CIFAR-10-sized Hugging Face datasets with Accelerate.

One module per concern: config (options), data (datasets, splits, loaders), decode (images to tensors),
augment, models (and the ModelSpec a trained model carries), optim, loop (train and evaluate), metrics,
ema, checkpoint, preemption, tracking (W&B), run_dir (the run folder's files), files (atomic writes,
strict JSON), report, runner (what one run does); train/main.py wires them together.
Tools: predict, export, compare, sweep_summary.
"""
