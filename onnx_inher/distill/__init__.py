"""Knowledge-distillation fine-tuning: losses, data, trainer, checkpoints (issue 5)."""
