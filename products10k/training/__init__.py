"""Training (stages ``train``, ``finetune_balanced``, ``finetune_accuracy``): data loading and
augmentation, the timm model, losses, optimizer and schedule, devices, DDP, checkpoints, the loop."""
