"""`lmforge scaling`: its options (added by `lmforge.cli`) and its command."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError

DEFAULT_SIZES = "32x1,64x2,96x3"
DEFAULT_TOKENS = "2e4,6e4,2e5"
WORLD_DOCUMENTS = 4000  # the synthetic world's corpus: ~0.6M tokens, more than the largest default budget
WORLD_VOCAB = 512


def scaling_options(p: ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/scaling",
                   help="where the data, the grid's runs, the plot and the fit go; a run already trained there is "
                        "reused, e.g. --out-dir runs/scaling (default: runs/scaling)")
    p.add_argument("--data", default=None,
                   help="a `lmforge data prepare` dir to train on, e.g. --data runs/data (default: the synthetic "
                        "world, written into OUT_DIR/data)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"model sizes as D_MODELxLAYERS (GPT-2 blocks, 16-dim heads), e.g. --sizes 32x1,64x2,128x2 "
                        f"(default: {DEFAULT_SIZES})")
    p.add_argument("--tokens", default=DEFAULT_TOKENS,
                   help="training-token budgets, each rounded up to whole steps, e.g. --tokens 1e5,3e5,1e6 "
                        f"(default: {DEFAULT_TOKENS})")
    p.add_argument("--flops", type=float, default=None,
                   help="the FLOP budget C whose compute-optimal N and D to report, e.g. --flops 1e15 (default: the "
                        "largest run's 6ND)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence, e.g. --seq-len 128 (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, e.g. --batch-size 16 (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate of every run (cosine to lr/10), e.g. --lr 1e-3 (default: 3e-3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda, e.g. --device cpu (default: auto)")
    p.add_argument("--plot", default=None,
                   help="the frontier plot's PNG, e.g. --plot report/scaling.png (default: OUT_DIR/frontier.png)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file, e.g. --json scaling.json")


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(item) for item in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise ConfigError(f"--tokens: '{text}' is not a comma-separated list of positive token counts; write e.g. "
                          f"--tokens {DEFAULT_TOKENS}")
    return sorted(set(budgets))


def _synthetic_data(data_dir: Path) -> Path:
    """The synthetic world's token shards in `data_dir/shards` (made once, then reused)."""
    from lmforge.data.readers import read_documents
    from lmforge.data.shards import INDEX_FILE, prepare_shards
    from lmforge.data.synthetic import WorldConfig, write_corpus
    from lmforge.tokenizer import train_tokenizer

    shards = data_dir / "shards"
    if not (shards / INDEX_FILE).is_file():
        files = write_corpus(WorldConfig(seed=0, n_documents=WORLD_DOCUMENTS, n_eval=8), data_dir / "world")
        tokenizer = train_tokenizer(read_documents([files["train"]]), WORLD_VOCAB, show_progress=False)
        prepare_shards([files["train"]], tokenizer, shards, val_fraction=0.05, progress=False)
    return shards


def cmd_scaling(args: Namespace) -> None:
    import numpy as np

    from lmforge.data.shards import load_shards
    from lmforge.scaling.fit import check_grid, fit_scaling_law
    from lmforge.scaling.grid import GridSettings, ModelSize, run_grid, steps_for
    from lmforge.scaling.report import describe, figures, plot_frontier
    from lmforge.tokenizer import Tokenizer

    if args.flops is not None and not args.flops > 0:
        raise ConfigError(f"--flops must be a positive FLOP count, got {args.flops}; write e.g. --flops 1e15")
    sizes = list(dict.fromkeys(ModelSize.parse(s) for s in args.sizes.split(",")))
    settings = GridSettings(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, device=args.device)
    steps = sorted({steps_for(b, settings) for b in _budgets(args.tokens)})
    # refused before any training: a grid the fit cannot use
    check_grid(np.repeat(np.arange(len(sizes)), len(steps)), np.tile(np.array(steps), len(sizes)))
    out_dir = Path(args.out_dir)
    data_dir = Path(args.data) if args.data else _synthetic_data(out_dir / "data")
    vocab_size = Tokenizer.from_file(load_shards(data_dir).directory).vocab_size
    budgets = [s * settings.tokens_per_step for s in steps]
    points = run_grid(sizes, budgets, data_dir, out_dir / "runs", settings, vocab_size)
    fit = fit_scaling_law(np.array([p.params for p in points]), np.array([p.tokens for p in points]),
                          np.array([p.val_loss for p in points]))
    result = figures(points, fit, args.flops or max(p.flops for p in points))
    plot = plot_frontier(Path(args.plot) if args.plot else out_dir / "frontier.png", points, fit)
    result["plot"] = str(plot)
    print("\n".join(describe(result)))
    print(f"plot: {plot}")
    if args.json:
        from lmforge.io import atomic_write_text

        written = atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"figures: {written}")
