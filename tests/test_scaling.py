"""`lmforge scaling`: the fit of L(N, D), its closed-form optimum, the grid's minimum, the grid runner's reuse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.scaling.fit import ScalingFit, fit_scaling_law

TRUE = dict(E=1.7, A=400.0, B=1100.0, alpha=0.34, beta=0.28)


def _surface(n: np.ndarray, d: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    return loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))


def test_fit_recovers_known_parameters_from_noisy_points():
    n = np.repeat(np.geomspace(1e4, 1e7, 5), 5)
    d = np.tile(np.geomspace(1e5, 1e9, 5), 5)
    fit = fit_scaling_law(n, d, _surface(n, d, noise=0.002))
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.05)
    assert fit.A == pytest.approx(TRUE["A"], rel=0.3)
    assert fit.B == pytest.approx(TRUE["B"], rel=0.3)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.1)
    assert fit.rms_log_residual < 0.004  # the noise is 0.002


def test_a_parameter_pinned_at_its_bound_is_not_identified_and_the_others_keep_finite_errors():
    """The default grid's losses on the synthetic world (one CPU's run): still falling fast, they pin E at its lower
    bound; the errors of the other four are then conditional on it, and the JSON stays strict."""
    n = np.repeat([12768, 100096, 335712], 3)
    d = np.tile([20480, 60416, 200192], 3)
    loss = np.array([4.9718, 4.164, 2.5474, 4.3752, 3.0571, 1.7096, 4.4804, 2.7687, 1.377])
    fit = fit_scaling_law(n, d, loss)
    assert fit.stderr["log_E"] is None
    assert all(0 < fit.stderr[k] < np.inf for k in ("log_A", "log_B", "alpha", "beta"))
    json.dumps(fit.as_dict(), allow_nan=False)  # strict JSON: no Infinity


def test_closed_form_optimum_matches_brute_force_search_over_the_fitted_surface():
    fit = ScalingFit(**TRUE, stderr={}, rms_log_residual=0.0, points=9)
    for flops in (1e15, 1e21):
        n_opt, d_opt = fit.optimum(flops)
        assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)
        grid = np.geomspace(n_opt / 100, n_opt * 100, 200_001)  # step of 4.6e-5 in log N
        brute = grid[np.argmin(fit.loss(grid, flops / (6 * grid)))]
        assert brute == pytest.approx(n_opt, rel=1e-4)


@pytest.mark.parametrize(("n", "d"), [
    ([1e4, 1e4, 1e5, 1e5, 1e6], [1e5, 1e6, 1e5, 1e6, 1e5]),  # 5 points for 5 parameters
    ([1e4] * 6, [1e5, 2e5, 3e5, 4e5, 5e5, 6e5]),  # one model size
])
def test_a_grid_too_small_to_fit_is_refused_naming_what_it_needs(n, d):
    with pytest.raises(ConfigError, match="needs at least 6 trained grid points with at least 2 distinct model sizes "
                                          "and 2 distinct token budgets"):
        fit_scaling_law(np.array(n), np.array(d), np.full(len(n), 3.0))


def test_cli_refuses_a_small_grid_in_one_line_before_training(tmp_path, capsys):
    code = main(["scaling", "--out-dir", str(tmp_path / "s"), "--sizes", "32x1,64x1", "--tokens", "1e4,2e4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "got 4 points, 2 sizes, 2 budgets" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("option", "fragment"), [
    (["--sizes", "64x2,wide"], "--sizes: 'wide' is not D_MODELxLAYERS"),
    (["--sizes", "8x2,16x2"], "--sizes: '8x2' is not D_MODELxLAYERS with d_model >= 16"),
    (["--tokens", "1e4,lots"], "--tokens: '1e4,lots' is not a comma-separated list"),
    (["--flops", "0"], "--flops must be a positive FLOP count"),
])
def test_cli_refuses_bad_grid_options_in_one_line(tmp_path, capsys, option, fragment):
    assert main(["scaling", "--out-dir", str(tmp_path / "s"), *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "s").exists()


def _world_shards(tmp_path):
    from lmforge.data.readers import read_documents
    from lmforge.data.shards import prepare_shards
    from lmforge.data.synthetic import WorldConfig, write_corpus
    from lmforge.tokenizer import train_tokenizer

    files = write_corpus(WorldConfig(seed=0, n_documents=200, n_eval=2), tmp_path / "world")
    tokenizer = train_tokenizer(read_documents([files["train"]]), 400, show_progress=False)
    prepare_shards([files["train"]], tokenizer, tmp_path / "data", val_fraction=0.1, progress=False)
    return tmp_path / "data", tokenizer.vocab_size


def test_grid_runner_trains_a_point_through_pretrain_and_reuses_it(tmp_path, monkeypatch):
    from lmforge.scaling.grid import GridSettings, ModelSize, run_point

    data, vocab_size = _world_shards(tmp_path)
    settings = GridSettings(seq_len=16, batch_size=4, device="cpu")
    point = run_point(ModelSize(16, 1), 64, data, tmp_path / "runs", settings, vocab_size)  # one step of 4 x 16
    assert (point.steps, point.tokens, point.reused) == (1, 64, False)
    # one block's weights (12 d^2), biases (9 d) and norms (4 d), the final norm (2 d); no embeddings
    assert point.params == 12 * 16 * 16 + 15 * 16
    assert 0 < point.val_loss < 10
    monkeypatch.setattr("lmforge.train.pretrain.pretrain", lambda *a, **k: pytest.fail("a trained point retrained"))
    again = run_point(ModelSize(16, 1), 64, data, tmp_path / "runs", settings, vocab_size)
    assert again.reused and again.val_loss == point.val_loss
    with pytest.raises(ConfigError, match="was trained with"):
        run_point(ModelSize(16, 1), 64, data, tmp_path / "runs", GridSettings(seq_len=16, batch_size=4, lr=1e-3),
                  vocab_size)


def test_cli_fits_a_grid_and_writes_every_figure_and_the_plot(tmp_path, capsys, monkeypatch):
    """The command end to end, each training replaced by the known surface's loss at its N and D (training is
    covered above; a real 3 x 3 grid takes minutes)."""
    from lmforge.model import build_model
    from lmforge.scaling.grid import non_embedding_params
    from lmforge.train.trainer import TrainResult

    def known_loss(config, resume):
        tokens = config.train.max_steps * config.train.batch_size * config.model.max_seq_len
        loss = float(_surface(np.array(non_embedding_params(build_model(config.model))), np.array(tokens), 0.0))
        return TrainResult(config.train.max_steps, loss, loss, 0.0, tmp_path)

    data, _ = _world_shards(tmp_path)
    monkeypatch.setattr("lmforge.train.pretrain.pretrain", known_loss)
    argv = ["scaling", "--data", str(data), "--out-dir", str(tmp_path / "s"), "--sizes", "16x1,32x2,64x3",
            "--tokens", "1e4,1e5,1e6", "--seq-len", "16", "--batch-size", "4", "--flops", "1e14",
            "--json", str(tmp_path / "fit.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens per parameter" in out and "Chinchilla: ~20" in out and "how far to trust it" in out
    result = json.loads((tmp_path / "fit.json").read_text())
    assert [p["tokens"] for p in result["points"]] == [10_048, 100_032, 1_000_000] * 3  # whole steps of 64 tokens
    assert result["fit"]["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-3)
    n_opt, d_opt = result["optimum"]["params"], result["optimum"]["tokens"]
    assert 6 * n_opt * d_opt == pytest.approx(1e14) and result["optimum"]["tokens_per_param"] == pytest.approx(
        d_opt / n_opt)
    assert any("extrapolation" in note for note in result["trust"])
    assert (tmp_path / "s" / "frontier.png").read_bytes().startswith(b"\x89PNG")
