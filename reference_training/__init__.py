"""Reference training: data, flow matching, few-step streaming distillation, decoder."""
