"""lm-evaluation-harness adapter: an lmforge decoder as lm_eval's model "lmforge", and `evaluate`, which runs named
lm-eval tasks on it (`lmforge eval harness`).

Importing this module registers the model: after `import lmforge.eval.harness`,
`lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=RUN", ...)` evaluates an lmforge run or checkpoint.
The requests are the ones lm-eval's own `hf` model would score: pairs are tokenised by lm-eval's `TemplateLM`,
loglikelihood_rolling cuts lm-eval's rolling windows, generate_until takes lm-eval's stop sequences and
max_gen_toks. What differs is how they run:

- loglikelihood: requests that share a context (a multiple-choice item's choices) are grouped; a batch of contexts
  runs once into a KV cache, the cache rows are repeated for each continuation, and the continuations run on top of
  it in one more forward (where that saves half the tokens; else each request is one row of a right-padded forward).
  The vocabulary projection is applied only where a token is scored, and a one-token continuation needs only the
  first forward. Each MLP computes its activation inside its first matmul (`fused_activations`).
- generate_until: every request through one `infer.engine.Engine` (continuous batching over the rows of a KV cache:
  batch_size full-context rows, or as many more as that memory holds when no request can fill more than its prompt
  and max_gen_toks); a request ends at EOS, at a stop sequence or after max_gen_toks.
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError, one_line

try:
    import lm_eval.models  # noqa: F401  (lm-eval's registry fills itself from this only while it is empty)
    from lm_eval import simple_evaluate
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
except ImportError as exc:
    raise LmforgeError(f"lm-evaluation-harness is not installed ({exc.name or one_line(exc)} is missing): "
                       "pip install 'lmforge[eval]'") from None

from lmforge.infer.decoding import fit_prompt
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.generate import SamplingConfig
from lmforge.model.attention import fused_qkv
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import fused_activations
from lmforge.tokenizer import Tokenizer

# a loglikelihood request as TemplateLM hands it over: (the key lm-eval caches the answer under, context ids,
# continuation ids)
Request = tuple[Any, list[int], list[int]]
GENERATION_KEYS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
                   "temperature", "top_k", "top_p")


def _padded(rows: Sequence[Sequence[int]], width: int, left: bool, device: torch.device) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """rows as one [B, width] id block and its mask (1 = real), padded on the left or the right with id 0."""
    # built as lists and made a tensor once: a slice assignment per row costs more than the forward of a short row
    pads = [[0] * (width - len(row)) for row in rows]
    ids = [pad + list(row) if left else list(row) + pad for row, pad in zip(rows, pads, strict=True)]
    mask = [[0] * len(pad) + [1] * len(row) if left else [1] * len(row) + [0] * len(pad)
            for row, pad in zip(rows, pads, strict=True)]
    return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device))


def _shares(batch: list[tuple[tuple[int, ...], list[int]]], requests: list[Request]) -> bool:
    """Whether running each context once for all its continuations (`_logits_shared`: a second forward, with a
    padding mask) is worth it: when that saves at least half the tokens a row per request would run. It is for multiple
    choice over a long question; not for rolling windows, whose shared context is one token."""
    saved = sum((len(members) - 1) * len(context) for context, members in batch)
    whole = sum(len(context) + len(requests[i][2]) - 1 for context, members in batch for i in members)
    return saved > 0 and 2 * saved >= whole


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """lm-eval's model interface over an lmforge decoder (GPT-2 or Llama family).

    `pretrained`: an lmforge run/checkpoint dir or Hugging Face dir, or a loaded `DecoderLM` (then pass `tokenizer`).
    `batch_size`: rows of a full-context forward; shorter loglikelihood requests pack into more rows, up to
    batch_size x max_length tokens; short generate_until prompts and answers decode in more rows, in as much
    memory."""

    def __init__(self, pretrained: str | Path | DecoderLM, tokenizer: Tokenizer | None = None,
                 batch_size: int | str = 16, max_gen_toks: int = 256, device: str | None = None) -> None:
        super().__init__()
        if isinstance(pretrained, (str, Path)):
            import lmforge
            from lmforge.infer.layout import column_major_linears

            model, own_tokenizer = lmforge.load(pretrained)
            column_major_linears(model)  # faster small-batch matmuls; the adapter only reads the weights
            tokenizer = tokenizer or own_tokenizer
        else:
            model = pretrained
        if getattr(getattr(model, "cfg", None), "arch", None) != "decoder":
            raise ConfigError(f"{pretrained} is not a decoder (GPT-2, Llama): the lm-eval adapter scores and "
                              "generates with decoders")
        if tokenizer is None:
            raise CheckpointError(f"{pretrained} has no tokenizer.json; lm-eval passes text, so the model needs one")
        if tokenizer.eos_id is None and tokenizer.bos_id is None:
            raise CheckpointError(f"{pretrained}'s tokenizer has neither a BOS nor an EOS token; lm-eval conditions "
                                  "a text's first token on one of them")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = (model.to(device) if device else model).eval()
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_text = tokenizer.decode([self.prefix_token_id])

    # -- what lm-eval asks of a model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def prefix_token_id(self) -> int:
        """What a text's first token is conditioned on: BOS, else EOS (as lm-eval's hf model)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return "lmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's ids; its post-processor (if any adds BOS) applies unless told not to or the text already
        starts with the prefix token, as for lm-eval's hf model."""
        add = add_special_tokens if add_special_tokens is not None else not string.startswith(self._prefix_text)
        return self.tokenizer.backend.encode(string, add_special_tokens=add).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- loglikelihood ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, greedy: bool = True,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding yields the continuation) per request; with
        `greedy` False (rolling windows, whose callers drop it) the second is False, not computed."""
        limit = self.max_length
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise LmforgeError(f"loglikelihood request {i} has a continuation that tokenises to nothing: "
                                   f"{requests[i][0]!r}")
            if len(continuation) > limit:
                raise LmforgeError(f"a continuation of {len(continuation)} tokens does not fit the {limit}-token "
                                   "context window")
            # as the hf model: a context that does not fit with the continuation loses its first tokens
            groups[tuple(context[-(limit + 1 - len(continuation)):])].append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge loglikelihood")
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        for part in self._parts(groups, requests):
            if batch and not self._fits(batch + [part], requests):
                self._score(batch, requests, results, greedy)
                progress.update(sum(len(m) for _, m in batch))
                batch = []
            batch.append(part)
        if batch:
            self._score(batch, requests, results, greedy)
            progress.update(sum(len(m) for _, m in batch))
        progress.close()
        return results

    def _parts(self, groups: dict[tuple[int, ...], list[int]],
               requests: list[Request]) -> list[tuple[tuple[int, ...], list[int]]]:
        """The context groups, longest context first, each cut into parts of at most batch_size x max_length tokens:
        one group can be large (every document's first rolling window shares the one prefix token)."""
        parts = []
        for context, members in sorted(groups.items(), key=lambda g: -len(g[0])):
            width = len(context) + max(len(requests[i][2]) for i in members) - 1
            step = max(1, self.batch_size * self.max_length // width)
            parts += [(context, members[start:start + step]) for start in range(0, len(members), step)]
        return parts

    def _fits(self, batch: list[tuple[tuple[int, ...], list[int]]], requests: list[Request]) -> bool:
        """Whether a batch of context groups, padded, fits the context window (a part alone always does) and holds
        at most batch_size rows of the full context: short requests pack into more rows (fewer, fuller forwards),
        in no more memory than batch_size full-length rows."""
        rows = [i for _, members in batch for i in members]
        if _shares(batch, requests):  # contexts, then continuations
            width = max(len(c) for c, _ in batch) + max(len(requests[i][2]) for i in rows) - 1
        else:  # each context and continuation in one row
            width = max(len(c) + len(requests[i][2]) - 1 for c, members in batch for i in members)
        return width <= self.max_length and len(rows) * width <= self.batch_size * self.max_length

    @torch.inference_mode()
    def _score(self, batch: list[tuple[tuple[int, ...], list[int]]], requests: list[Request],
               results: list[tuple[float, bool]], greedy: bool) -> None:
        """Score one batch of context groups into `results`."""
        members = [i for _, group in batch for i in group]
        continuations = [requests[i][2] for i in members]
        with fused_qkv(self.model), fused_activations(self.model):
            if _shares(batch, requests):
                logits = self._logits_shared(batch, continuations)
            else:
                logits = self._logits_whole([c for c, group in batch for _ in group], continuations)
        logits = logits.float()
        targets, real = _padded(continuations, logits.shape[1], False, logits.device)
        # log p(target) = its logit - logsumexp of the row: no [N, W, V] log-softmax is written and read back
        token_log_probs = (logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
                           ).masked_fill(real == 0, 0.0)
        greedy_rows = (((logits.argmax(-1) == targets) | (real == 0)).all(dim=1).tolist() if greedy
                       else [False] * len(members))
        for i, total, is_greedy in zip(members, token_log_probs.sum(dim=1).tolist(), greedy_rows, strict=True):
            results[i] = (total, is_greedy)
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])

    def _logits_whole(self, contexts: list[tuple[int, ...]], continuations: list[list[int]]) -> torch.Tensor:
        """[N, W, V] logits predicting each continuation's tokens (right-padded to the longest, W), with one
        context per continuation: each context + continuation (less its last token) in one right-padded forward.
        Right padding needs no mask (a causal model's real positions never see it), so attention takes the fast
        causal kernel."""
        model, device = self.model, self.model.device
        rows = [list(c) + cont[:-1] for c, cont in zip(contexts, continuations, strict=True)]
        ids, _ = _padded(rows, max(len(r) for r in rows), False, device)
        width = max(len(c) for c in continuations)
        # the hidden state before each continuation token: positions len(context) - 1 onwards
        starts = torch.tensor([len(c) - 1 for c in contexts], device=device)
        where = (starts[:, None] + torch.arange(width, device=device)).clamp(max=ids.shape[1] - 1)
        hidden = model.hidden(ids)
        return model.lm_head(hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1])))

    def _logits_shared(self, batch: list[tuple[tuple[int, ...], list[int]]],
                       continuations: list[list[int]]) -> torch.Tensor:
        """As `_logits_whole` for contexts that several continuations share: the contexts, right-padded (the causal
        kernel again), run once into a KV cache, whose rows are then repeated for each continuation, and the
        continuations run on top of it, with a mask hiding the contexts' padding."""
        model, device = self.model, self.model.device
        owner = torch.tensor([g for g, (_, group) in enumerate(batch) for _ in group], device=device)
        context_ids, context_mask = _padded([c for c, _ in batch], max(len(c) for c, _ in batch), False, device)
        rest = max(len(c) for c in continuations) - 1
        cache = model.new_cache(len(batch), context_ids.shape[1] + rest)
        hidden = model.hidden(context_ids, cache=cache)
        last = torch.tensor([len(c) - 1 for c, _ in batch], device=device)
        # [N, 1, V]: each continuation's first token, predicted at its context's last token
        logits = model.lm_head(hidden[torch.arange(len(batch), device=device), last])[owner, None]
        if rest:
            cache.reorder(owner)
            ids, mask = _padded([c[:-1] for c in continuations], rest, False, device)
            later = model(ids, cache=cache, attention_mask=torch.cat([context_mask[owner], mask], dim=1))
            logits = torch.cat([logits, later], dim=1)
        return logits

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's rolling windows of the context length (each token predicted
        once, with as much context as fits), summed per text."""
        windows: list[Request] = []
        owners: list[int] = []
        for n, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm, greedy=False),
                                   strict=True):
            totals[n] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------
    def _requests(self, gen_kwargs: dict, prompts: list[list[int]]) -> list[GenerationRequest]:
        """The engine requests for prompts under one task's generation_kwargs (lm-eval's stop sequences, EOS among
        them, and max_gen_toks); a prompt that does not fit keeps its last tokens, as for the hf model."""
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise ConfigError(f"generation_kwargs {', '.join(unknown)} not supported by the lmforge model; it takes "
                              f"{', '.join(GENERATION_KEYS)}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs["until"], eos=self.tokenizer.decode([self.eot_token_id]))
        cfg = SamplingConfig(max_new_tokens=kwargs["max_gen_toks"], truncate_prompt=True,
                             temperature=float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0,
                             top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
        return [GenerationRequest(fit_prompt(ids, self.max_length, cfg.max_new_tokens, truncate=True),
                                  cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                  stop_ids=frozenset({self.eot_token_id}), stop_strings=tuple(until),
                                  skip_special_tokens=True) for ids in prompts]

    def _generation_rows(self, requests: list[GenerationRequest]) -> int:
        """Rows of the engine's cache: as many as fit the memory of batch_size full-context rows when no request
        can fill more than its prompt and max_new_tokens (short prompts and answers decode in fewer, fuller steps),
        at least batch_size, at most one per request."""
        span = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        return max(1, min(len(requests), max(self.batch_size, self.batch_size * self.max_length // span)))

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to the first stop sequence (the text before it), EOS or max_gen_toks:
        every request through one engine (continuous batching over the rows of a KV cache)."""
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_kwargs[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        queued: list[tuple[int, GenerationRequest]] = []
        for members in by_kwargs.values():
            prompts = [self.tok_encode(requests[i].args[0]) for i in members]
            queued += zip(members, self._requests(requests[members[0]].args[1], prompts), strict=True)
        engine = Engine(self.model, self.tokenizer, max_batch=self._generation_rows([r for _, r in queued]))
        owner = {engine.submit(request): i for i, request in queued}
        texts = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge generate_until")
        while engine.has_work:
            for event in engine.step():
                texts[owner[event.request_id]] += event.text
                progress.update(event.finish_reason is not None)
        progress.close()
        outputs = [postprocess_generated_text(text, requests[i].args[1].get("until"), None)
                   for i, text in enumerate(texts)]
        for request, output in zip(requests, outputs, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, output)
        return outputs


# -- running named tasks ------------------------------------------------------------------------------


def task_manager(include_path: str | Path | None) -> TaskManager:
    """lm-eval's task index: only the tasks under `include_path` when given (its ~14,000 bundled tasks are not
    indexed), else the bundled ones."""
    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a directory; give a directory of lm-eval task YAML "
                          "files (each with a `task: NAME` key)")
    manager = TaskManager(include_defaults=False, include_path=str(include_path))
    if not manager.all_tasks:
        raise ConfigError(f"--include-path {include_path} holds no lm-eval task YAML (files with a `task: NAME` key)")
    return manager


def require_tasks(manager: TaskManager, names: Sequence[str], include_path: str | Path | None) -> None:
    """ConfigError naming the first task (or group or tag) `manager` does not know, with what it knows."""
    for name in names:
        if name in manager.all_tasks:
            continue
        if include_path is not None:
            raise ConfigError(f"unknown lm-eval task '{name}' (--tasks); --include-path {include_path} has: "
                              f"{', '.join(manager.all_tasks)}")
        close = difflib.get_close_matches(name, manager.all_tasks, n=5)
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise ConfigError(f"unknown lm-eval task '{name}' (--tasks); {hint}lm-eval bundles {len(manager.all_tasks)} "
                          "(`lm-eval ls tasks` lists them), or give your own with --include-path DIR")


def evaluate(pretrained: str | Path, tasks: Sequence[str], include_path: str | Path | None = None,
             limit: int | None = None, batch_size: int = 16) -> dict:
    """lm-eval's results dict for `tasks` on an lmforge run or checkpoint (samples left out)."""
    manager = task_manager(include_path)
    require_tasks(manager, tasks, include_path)
    model = LmforgeLM(pretrained, batch_size=batch_size)
    try:
        return simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    except FileNotFoundError as exc:  # a task's data_files
        raise DataError(f"a task's data is missing: {one_line(exc)} (relative data_files are read from the working "
                        "directory)") from None


def results_json(results: dict) -> str:
    """`results` as lm-eval's own CLI writes it (values JSON does not know become strings)."""
    return json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False) + "\n"


def results_table(results: dict) -> str:
    return lm_utils.make_table(results)
