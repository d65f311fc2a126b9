"""Fine-tuning: settings, training data, LoRA, checkpoints, the loop, the training job."""
