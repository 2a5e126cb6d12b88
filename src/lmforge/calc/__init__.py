"""`lmforge calc`: the accounting behind scale, from a model config alone (no weights, no compute).

flops.py         parameters and exact per-layer FLOPs (torch's FLOP counter on a meta-device model), the linear layer
memory.py        training memory (weights, gradients, master weights, Adam states, activations), LoRA / QLoRA, KV cache
accelerators.py  peak FLOP/s of known accelerators; training time at an assumed MFU
presets.py       GPT-3 175B, Llama-65B and the demo decoder; a model from a run, checkpoint or config YAML
figures.py       every figure of a model in one dict (`model_figures`), as `lmforge calc model --json` prints it
command.py       the CLI: `lmforge calc model`, `lmforge calc linear`
"""
