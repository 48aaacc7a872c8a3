"""The fine-tuned teacher (Kaddour & Liu 2024): fine-tune a causal LM on a few labelled rows with Ray Train
and DeepSpeed (ZeRO-3) or LoRA, export a standard HF folder that vLLM serves, then annotate a pool or
generate new pairs with it. Modules: shape/plan (memory calculator), config, formats (training text),
worker (the Ray Train loop), train (the driver), export, annotate, generate, recipe (the chained run)."""
