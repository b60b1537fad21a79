"""Train torchvision classifiers on CIFAR-10-sized Hugging Face datasets with Accelerate.

One module per concern: config, data, augment, models, optim, loop, metrics, checkpoint,
preemption, tracking, run_dir, report; train/main.py wires them together.
"""
