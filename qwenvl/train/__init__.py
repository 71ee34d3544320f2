"""Training side of qwenvl: flags (arguments), model loading / freezing / LoRA (model),
optimizer groups (optim), the Trainer subclass (trainer) and the entry point (train_qwen).

The data side is reached only through ``qwenvl.data.dataset.make_supervised_data_module``.
"""
