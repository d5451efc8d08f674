"""PRoLoRA / LoRA adapter training."""
