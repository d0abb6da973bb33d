"""`peftlab select`: rank candidate bases (and methods) for a classification recipe before paying for fine-tuning.

    rows = select(load_recipe("recipes/minilm/sst2-lora.yaml"), ["minilm", "../shared/models/smollm2-135m-instruct"])
    print(format_table(rows, "probe"))

Each candidate is the recipe with another `model.name` (and, with `methods`, another `adapter.method`); anything
`model.name` accepts is a candidate (bases.py resolves it, model.py loads it). The estimates come from a seeded sample of
at most `max_rows` rows of the recipe's training split (less its `data.eval_holdout`, as a run would train on), and
nothing else: data.eval and data.test are never read. The proxies:

- probe: the frozen base encodes the rows once (masked mean of the last hidden states for encoders; the last non-padding
  token's for decoder-only LLMs, as their classification head reads it), then an L2-regularised softmax regression is
  scored by stratified k-fold cross-validation (its L2 strength chosen inside each training fold). Estimate: mean fold
  accuracy; uncertainty: the standard deviation over the folds.
- logme: LogME (You et al. 2021) on the same features: the log marginal likelihood per row of a Bayesian linear model
  from the features to each class's one-hot target, its prior and noise precisions set by evidence maximisation (the
  fixed-point iteration on the SVD of the features), averaged over classes. Higher is better; comparable between bases
  on one task only. Uncertainty: the grouped jackknife standard error over the k folds. It needs more rows than feature
  dimensions in every jackknife part (logme_rows_problem); with no more, its figure fails.
- steps: the candidate's own recipe trained for `steps` optimizer steps (peftlab's `run`, in a temporary folder, with
  train.report_to none) on the sample less one fold, scored on that fold. Uncertainty: the binomial standard error of
  that accuracy.

probe and logme read the base only, so they rank bases, not methods (every method of one base gets the same figure; a
`scratch` candidate is read with its random initialisation). Only `steps` tells methods apart. For a verbalizer recipe
the features read each row's text as a classification head would (no prompt, no label word); `steps` runs the
verbalizer itself.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torch

from .accel import FrozenWeightsCast, half_dtype
from .config import Recipe, SplitConfig, load_recipe, validate
from .errors import ConfigError, ModelNotFound, PeftlabError, TrainingInterrupted

log = logging.getLogger(__name__)

PROXIES = ("probe", "logme", "steps")
PROXY_TITLES = {"probe": "probe acc", "logme": "LogME", "steps": "steps acc"}
UNCERTAINTY = {"probe": "std over folds", "logme": "jackknife s.e.", "steps": "binomial s.e."}
L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4)  # the probe's L2 strengths, tried in this order (on standardised features, loss = mean CE + l2 * |W|^2)
TRAIN_ONLY = "estimated from the training split only: data.eval and data.test were not read"


class SelectError(PeftlabError, ValueError):
    """What to rank or how is wrong (candidates, methods, proxies, sizes, --set names); the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("peftlab select: " + " ".join(self.problems))


@dataclass
class Estimate:
    value: float
    std: float  # the uncertainty: UNCERTAINTY[proxy] says which
    seconds: float  # this proxy's own compute (the features are counted once per base, in SelectRow.features_seconds)


@dataclass
class SelectRow:
    """One candidate (base x method) and its estimates; `rank` 1 is the best by the chosen proxy."""

    rank: int
    base: str  # model.name as given
    method: str
    pooling: str  # how the features read the base: "mean" (encoders) or "last-token" (decoder-only LLMs)
    feature_dim: int
    rows: int  # training rows the estimates used
    features_seconds: float  # loading the base and encoding the rows (once per base, shared by its methods)
    features_group: int = 0  # rows of one group share one encoding, and their probe and LogME figures (0: no features)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    error: str | None = None  # why this candidate has no figures (it could not load or train); its rank is 0
    failures: dict[str, str] = field(default_factory=dict)  # proxy -> why it has no figure (NaN) while the others have theirs
    label: str = ""  # the base's name in the table, unique among the candidates (base_labels); default: base_label(base)

    def __post_init__(self):
        self.label = self.label or base_label(self.base)


@dataclass
class _Base:
    """One base as loaded, shared by its methods' rows: its features (none where it did not encode) and its probe and
    LogME figures, or the error each failed with."""
    feats: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    pooling: str = "-"
    seconds: float = 0.0
    group: int = 0  # SelectRow.features_group
    figures: dict[str, Estimate | Exception] = field(default_factory=dict)


@dataclass
class _Candidate:
    base: str
    method: str
    recipe: Recipe  # what a run of this candidate would train: the steps proxy runs it (a refused one: the recipe as given)
    features: Recipe  # the same without the method's own --set overrides: the probe and LogME read the base through it
    refused: str | None = None  # what `peftlab validate` finds against this candidate's recipe: it gets a failed row, no compute
    label: str = ""  # its base's name in tables and messages (base_labels: unique among the candidates)

    def __post_init__(self):
        self.label = self.label or base_label(self.base)

    def features_key(self) -> str:
        """What the features depend on: the base as loaded (quantization, dtype; pretrained or scratch's random
        initialisation), how rows are tokenized and batched. Methods that share it share the features."""
        from .methods import get_method

        r = self.features
        return repr((asdict(r.model), asdict(r.quant), r.data.max_length, r.eval.batch_size, r.train.precision, r.train.seed,
                     get_method(r.adapter.method).pretrained))


# ------------------------------------------------------------------------------------------------------ candidates

def check_task(recipe: Recipe) -> None:
    """Only tasks that learn a class per row (task.target_kind 'label') have what the proxies score."""
    from .tasks import get_task, task_names

    task = get_task(recipe.task.type)
    if task.target_kind != "label" or hasattr(task, "refuse_loading"):  # a multi-task recipe: labels per task, no one set to probe
        ok = [n for n in task_names() if _target_kind(n) == "label" and not hasattr(get_task(n), "refuse_loading")]
        raise ConfigError([f"peftlab select ranks bases for single-task classification recipes (task.type {' or '.join(ok)}); "
                           f"this recipe is task.type={recipe.task.type}, which has no one set of class labels to probe. Use a "
                           "classification recipe, e.g. recipes/minilm/sst2-lora.yaml (for a multi-task recipe, one of its tasks'"
                           " data)."])
    if recipe.model.from_run:
        raise ConfigError([f"model.from_run={recipe.model.from_run!r}: peftlab select ranks bases as published (model.name, "
                           "--bases); it would probe the bare base, not that run's weights. Drop model.from_run to choose a "
                           "base, then train from the run with the one chosen."])


def _target_kind(name: str) -> str | None:
    from .tasks import get_task

    try:
        return get_task(name).target_kind
    except Exception:  # a registered task whose module does not import here is not a choice to offer
        return None


def base_label(name: str) -> str:
    """A short name for tables: a folder or file's own name, a packaged or hub name as it is."""
    path = Path(name)
    return path.name if _local(name) else name


def _local(name: str) -> bool:
    """A base named by its path (a folder or file here), not a packaged or hub name."""
    return bool((name.startswith((".", "/", "~")) or Path(name).exists()) and Path(name).name)


def base_labels(bases: list[str]) -> dict[str, str]:
    """Each base's name for the table, distinct from the others': base_label, and where two bases share it (a/model and
    b/model), as many of their folders' parent folders as tell them apart (a/model, b/model)."""
    parts = {b: Path(os.path.normpath(os.path.abspath(os.path.expanduser(b)))).parts if _local(b) else () for b in bases}
    depth = dict.fromkeys(bases, 1)

    def label(b: str) -> str:
        return Path(*parts[b][-depth[b]:]).as_posix() if depth[b] > 1 else base_label(b)

    while True:
        same: dict[str, list[str]] = {}
        for b in bases:
            same.setdefault(label(b), []).append(b)
        grow = [b for group in same.values() if len(group) > 1 for b in group if depth[b] < len(parts[b])]
        if not grow:
            return {b: label(b) for b in bases}
        for b in grow:
            depth[b] += 1


def same_bases(resolved: dict[str, str]) -> dict[str, str]:
    """{base as given: the model it resolves to (resolve_model_path)} -> {a repeat: the first spelling given of its model}
    for every base that names a model given before by another spelling (`m`, `m/`, `../here/m`, a link to it)."""
    first: dict[str, str] = {}
    repeats = {}
    for b, found in resolved.items():
        key = str(Path(found).resolve()) if Path(found).exists() else found
        if key in first:
            repeats[b] = first[key]
        else:
            first[key] = b
    return repeats


def candidate_overrides(recipe: Recipe, base: str, method: str, overrides: dict[str, list[str]] | None = None,
                        method_extras: bool = True) -> list[str]:
    """The recipe overrides that make one candidate: its base and method, the architecture's default adapter modules
    when either differs from the recipe's (the recipe's names belong to its own base and method), then the extra
    overrides given for the base, then those given for the method. benchmarks/model_selection.py trains the same ones."""
    extra = overrides or {}
    reset = base != recipe.model.name or method != recipe.adapter.method
    return [f"model.name={base}", f"adapter.method={method}", *(["adapter.target_modules=null"] if reset else []),
            *extra.get(base, []), *(extra.get(method, []) if method_extras else [])]


def load_selection_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """The recipe as `peftlab train` loads it, its files checked too (data.train's), but for data.eval's and data.test's:
    select never reads them (train_sample), so they need not exist, as the README says (a missing one refused it)."""
    recipe = load_recipe(path, overrides, validate_files=False)
    train_only = copy.deepcopy(recipe)
    train_only.data.eval = train_only.data.test = None
    train_only.train.early_stopping = None  # (its rule wants an evaluation split: checked with the recipe, above)
    validate(train_only, source=str(path))
    return recipe


def derive(recipe: Recipe, overrides: list[str], where: str) -> Recipe:
    """The recipe with dotted overrides applied, typed and validated as `peftlab train` would (through its YAML)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-select-") as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(recipe.to_yaml(), encoding="utf-8")
        try:
            return load_recipe(path, overrides, validate_files=False)
        except ConfigError as e:
            raise ConfigError(e.problems, where) from None


def build_candidates(recipe: Recipe, bases: list[str], methods: list[str] | None, overrides: dict[str, list[str]]) -> list[_Candidate]:
    """Every base resolved and every candidate's recipe validated before any compute: a typo fails in a second. What
    `peftlab validate` finds against one candidate's base (model.model_problems: the task's tokenizer check, e.g. no chat
    template for a chat verbalizer; the task's model class for its architecture; data.max_length against its positions)
    refuses that candidate only (its `refused`): the recipe could not train it, so its figures would rank what cannot
    be chosen; the others go on. So does a combination the recipe's own checks refuse (a 4-bit recipe with
    adapter.method=full, a --set for one base that its method cannot take): the valid candidates are still ranked. A
    name that is no method or no model is a typo, not a candidate: it stops the selection, every such name said at once."""
    from .bases import resolve_model_path
    from .methods import method_names
    from .model import model_problems

    if not bases:
        raise SelectError(["no candidates: name at least one base, e.g. --candidates minilm ../shared/models/smollm2-135m-instruct"])
    methods = list(dict.fromkeys(methods or [recipe.adapter.method]))
    bases = list(dict.fromkeys(bases))
    unknown = sorted(set(overrides) - set(bases) - set(methods))
    if unknown:
        raise SelectError([f"--set {k}:...: {k!r} is neither a candidate ({', '.join(bases)}) nor a method ({', '.join(methods)}); "
                           "extra overrides are given per candidate or per method, as NAME:KEY=VALUE." for k in unknown])
    if unknown := [m for m in methods if m not in method_names()]:  # a typo stops the selection, as a base's does
        raise ConfigError([f"--methods {m!r}: no such method; choose from {', '.join(method_names())} (adapter.method='{m}')."
                           for m in unknown])
    missing, resolved = [], {}
    for base in bases:  # every name that resolves to no model, at once: one rerun fixes them all
        try:
            resolved[base] = resolve_model_path(base, recipe.model.revision)
        except ModelNotFound as e:
            missing.append(f"candidate {base!r}: {one_line(e)}")
    if missing:
        raise ModelNotFound(missing[0] if len(missing) == 1 else
                            f"{len(missing)} candidates resolve to no model:" + "".join(f"\n  - {m}" for m in missing))
    if repeats := same_bases(resolved):  # one model by several spellings: loaded, encoded and ranked once
        overrides = {k: list(v) for k, v in overrides.items()}
        for again, kept in repeats.items():
            log.warning("select: candidate %s is %s again (the same model): dropped, ranked once as %s", again, kept, kept)
            overrides[kept] = overrides.get(kept, []) + overrides.pop(again, [])  # its --set too
        bases = [b for b in bases if b not in repeats]
    out = []
    labels = base_labels(bases)
    for base in bases:
        for method in methods:
            where = f"candidate {labels[base]} with adapter.method={method}"
            try:
                full = derive(recipe, candidate_overrides(recipe, base, method, overrides), where)
            except ConfigError as e:  # what `peftlab validate` refuses for this base x method (and its --set): a failed row
                refused = " ".join(one_line(problem) for problem in e.problems)
                log.error("select: %s %s refused: %s", labels[base], method, refused)
                out.append(_Candidate(base, method, recipe, recipe, refused, labels[base]))
                continue
            features = full
            if overrides.get(method):  # the base's features without the method's own overrides (where it is valid without them)
                with contextlib.suppress(ConfigError):
                    features = derive(recipe, candidate_overrides(recipe, base, method, overrides, False), where)
            refused = " ".join(one_line(problem) for problem in model_problems(full))
            if refused:
                log.error("select: %s %s refused: %s", labels[base], method, refused)
            out.append(_Candidate(base, method, full, features, refused or None, labels[base]))
    return out


# ------------------------------------------------------------------------------------------------------ the rows

def train_sample(recipe: Recipe, max_rows: int):
    """A seeded sample of at most `max_rows` rows {text, label} of the rows a run of `recipe` trains on (its train split
    less the data.eval_holdout part when it has no data.eval), and the label names. data.eval and data.test are not read."""
    from .data import load_splits

    r = copy.deepcopy(recipe)
    r.data.eval_holdout = r.data.eval_holdout if r.data.eval is None else 0.0
    r.data.eval = r.data.test = None
    r.train.early_stopping = None  # (its rule wants an evaluation split; nothing trains here)
    splits, label_names = load_splits(r, overlap=False)  # (the held-out part is no split select scores)
    ds = splits["train"]
    if len(ds) > max_rows:
        ds = ds.shuffle(seed=recipe.data_seed).select(range(max_rows))
    return ds, label_names


def check_classes(labels: np.ndarray, label_names: list[str], folds: int, max_rows: int) -> None:
    """Fewer than two classes among the rows: every base scores a perfect probe (it ranked them all 1.000), refused. A
    class absent from the sample (the seeded --max-rows drew none of it), or with fewer rows than folds (some folds test
    without it): the figures say little about it, warned."""
    counts = np.bincount(labels, minlength=len(label_names))
    present = [n for n, c in zip(label_names, counts) if c]
    if len(present) < 2:
        raise SelectError([f"the training rows sampled ({len(labels)}) hold one class only ({', '.join(present)}): every base "
                           "would score perfectly. Check data.train's labels, or raise --max-rows if other classes are rare."])
    if absent := [n for n, c in zip(label_names, counts) if not c]:
        log.warning("select: no row of class(es) %s among the %d rows sampled: the figures ignore them. Raise --max-rows "
                    "(now %d) to include them.", absent, len(labels), max_rows)
    if rare := [f"{n} ({c})" for n, c in zip(label_names, counts) if 0 < c < folds]:
        log.warning("select: class(es) %s have fewer rows than the %d folds: some folds are scored without them, and "
                    "the figures say little about them. Raise --max-rows, or use fewer folds.", ", ".join(rare), folds)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) of each row: every class spread evenly over the folds, in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


# ------------------------------------------------------------------------------------------------------ features

def pooling_of(config) -> str:
    """Decoder-only LLMs (a causal LM architecture with no masked-LM form) see a row only at its last token; encoders
    are read by the masked mean over the tokens."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    return "last-token" if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "mean"


@torch.no_grad()
def encode(recipe: Recipe, ds, label_names: list[str]) -> tuple[np.ndarray, str]:
    """The frozen base's features of each row (float32, rows x hidden) and the pooling used. The base loads as a run of
    `recipe` loads it (quantization, dtype; adapter.method=scratch: its random initialisation), no adapter applied; the
    rows are tokenized as the classification task tokenizes them (data.max_length) and batched by length."""
    from .accel import resolve_precision
    from .bases import load_tokenizer, resolve_model_path
    from .data import report_truncation
    from .model import check_input_lengths, load_base
    from .tasks import get_task

    task = get_task("classification")
    precision = resolve_precision(recipe.train.precision)
    path = resolve_model_path(recipe.model.name, recipe.model.revision)
    torch.manual_seed(recipe.train.seed)  # a scratch candidate's random initialisation
    tokenizer = load_tokenizer(path, recipe)
    model, _ = load_base(recipe, path, num_labels=len(label_names), label_names=label_names, precision=precision,
                         auto_cls=task.auto_model_class)
    check_input_lengths(model.config, recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if recipe.quant.mode == "none":
        model.to(device)
    backbone, pooling = model.base_model.eval(), pooling_of(model.config)
    tokens = task.tokenize(ds, tokenizer, recipe)
    report_truncation(tokens, "select rows", recipe.data.max_length)
    collate, order = task.collator(tokenizer), np.argsort(tokens["length"], kind="stable")
    half = half_dtype(precision)
    out = None
    model.requires_grad_(False)  # only read: its linear weights are cast to `half` once (train.cast_frozen), not per batch
    with FrozenWeightsCast(backbone, half if recipe.train.cast_frozen else None):
        for start in range(0, len(order), recipe.eval.batch_size):
            idx = order[start:start + recipe.eval.batch_size].tolist()
            batch = {k: v.to(device) for k, v in collate([tokens[i] for i in idx]).items() if k != "labels"}
            with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                hidden = backbone(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].to(hidden.dtype)
            if pooling == "mean":
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            else:  # the last position holding a token, with left or right padding alike
                last = (mask * torch.arange(mask.shape[1], device=device)).argmax(1)
                pooled = hidden[torch.arange(len(idx), device=device), last]
            if out is None:
                out = np.zeros((len(order), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled.cpu().numpy()
    del model, backbone
    gc.collect()
    return out, pooling


def encode_timed(c: _Candidate, ds, label_names: list[str]) -> tuple[np.ndarray, str, float]:
    """`encode` for one candidate's base -> (features, pooling, seconds)."""
    start = time.perf_counter()
    feats, pooling = encode(c.features, ds, label_names)
    seconds = time.perf_counter() - start
    log.info("select: %s encoded (%s pooling, %d dims) in %.1f s", c.label, pooling, feats.shape[1], seconds)
    return feats, pooling, seconds


# ------------------------------------------------------------------------------------------------------ the probe

def fit_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, init=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS: minimises mean cross-entropy + l2 * |W|^2 (the bias is not penalised),
    from zero or from `init` (W, b)."""
    w = (init[0].clone() if init else torch.zeros(x.shape[1], classes, dtype=x.dtype)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(classes, dtype=x.dtype)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=100, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)  # from the training part only
    return [(t - mean) / std for t in (train, *others)]


def _accuracy(x: torch.Tensor, y: torch.Tensor, wb) -> float:
    return ((x @ wb[0] + wb[1]).argmax(1) == y).double().mean().item()


def probe_fold(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int,
               seed: int) -> float:
    """Test accuracy of the probe fitted on one training fold, its L2 strength chosen on a seeded fifth of that fold
    (the path from the strongest to the weakest, each fit starting from the previous one)."""
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    inner, check = perm[len(perm) // 5:], perm[:len(perm) // 5]
    xi, xc = _standardise(x_train[inner], x_train[check])
    scores, wb = [], None
    for lam in L2_GRID:
        wb = fit_softmax(xi, y_train[inner], classes, lam, wb)
        scores.append((_accuracy(xc, y_train[check], wb), lam))
    l2 = max(scores, key=lambda t: (t[0], t[1]))[1]  # ties: the stronger regularisation
    xt, xs = _standardise(x_train, x_test)
    return _accuracy(xs, y_test, fit_softmax(xt, y_train, classes, l2))


def probe(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, classes: int, seed: int = 0) -> tuple[float, float]:
    """k-fold cross-validated accuracy of a linear probe -> (mean over the folds, standard deviation over the folds)."""
    x, y = torch.from_numpy(features.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
    accs = []
    with one_thread():
        for f in range(int(folds.max()) + 1):
            test = torch.from_numpy(folds == f)
            accs.append(probe_fold(x[~test], y[~test], x[test], y[test], classes, seed + f))
    return float(np.mean(accs)), float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0


@contextmanager
def one_thread():
    """The probe's hundreds of small L-BFGS steps and LogME's SVDs of a few hundred columns gain nothing from threads
    and lose to their synchronisation: 5-15x slower with two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ LogME

def logme_evidence(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int, max_iter: int = 100, tol: float = 1e-6):
    """LogME for one target (You et al. 2021, Algorithm 1), on the thin SVD F = U diag(s) V^T of the n x d features:
    `z` = U^T y, `y_norm2` = |y|^2. The prior w ~ N(0, I/alpha) and the noise N(0, 1/beta) are set by the fixed point
    alpha = gamma / |m|^2, beta = (n - gamma) / |Fm - y|^2 with gamma = sum beta s^2 / (alpha + beta s^2) and m the
    posterior mean. -> (log evidence log p(y | F, alpha, beta) / n at the fixed point, alpha, beta)."""
    sigma = s * s  # the eigenvalues of F^T F (the d - len(s) others are 0)
    outside = max(y_norm2 - float(z @ z), 0.0)  # the part of y outside the span of F
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        shrink = alpha + beta * sigma
        gamma = float((beta * sigma / shrink).sum())
        m2 = float((beta**2 * sigma * z * z / shrink**2).sum())  # |m|^2, m = beta V diag(s / shrink) z
        res2 = float(((alpha / shrink) ** 2 * z * z).sum()) + outside  # |F m - y|^2
        new_alpha, new_beta = gamma / max(m2, 1e-300), (n - gamma) / max(res2, 1e-300)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    shrink = alpha + beta * sigma  # m and the residual at the final alpha, beta: the evidence is then exact for them
    m2 = float((beta**2 * sigma * z * z / shrink**2).sum())
    res2 = float(((alpha / shrink) ** 2 * z * z).sum()) + outside
    log_det = float(np.log(shrink).sum()) + (d - len(s)) * math.log(alpha)  # log |alpha I + beta F^T F|
    evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * res2 - alpha / 2 * m2 - log_det / 2)
    return evidence / n, alpha, beta


def logme_rows(n: int, folds: int = 1) -> int:
    """The fewest rows LogME reads of n: those of a jackknife part (n less its largest fold) with k >= 2 folds, else n."""
    return n - -(-n // folds) if folds >= 2 else n


def logme_rows_problem(n: int, d: int, folds: int = 1) -> str | None:
    """Why LogME cannot read n rows of d-dimensional features (jackknifed over `folds` folds), and what gives it
    enough; None when it can. With no more rows than dimensions the features fit any labelling: the evidence rises
    towards a limit as the noise precision grows, with no maximum, and the fixed point stops anywhere (beta 1e7..1e16)
    or overflows, as the noise falls."""
    if logme_rows(n, folds) > d:
        return None
    part = f" (its jackknife parts, each without one of the {folds} folds, {logme_rows(n, folds)})" if folds >= 2 else ""
    enough = next(m for m in itertools.count(n) if logme_rows(m, folds) > d)
    more_folds = next((k for k in range(folds + 1, n // 2 + 1) if logme_rows(n, k) > d), None) if n > d else None
    return (f"LogME on {n} rows{part} of {d}-dimensional features: it needs more rows than feature dimensions (with no more, the "
            f"features fit any labelling and the evidence has no maximum). Give it at least {enough} rows (--max-rows, and "
            f"data.train.max_samples where it limits the training split)" + (f", or use --folds {more_folds}" if more_folds else "")
            + ", or rank with --proxies probe.")


def logme(features: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """LogME of features for a classification: the mean over the classes present of the evidence of the one-hot target.
    Raises SelectError on no more rows than feature dimensions (logme_rows_problem), or where it does not converge."""
    n, d = features.shape
    if problem := logme_rows_problem(n, d):
        raise SelectError([problem])
    with one_thread():
        u, s, _ = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(features.astype(np.float64)), full_matrices=False))
    scores = []
    for c in range(classes):
        y = (labels == c).astype(np.float64)
        if not y.any():  # a class with no row here (in data.label_names, or left out of a jackknife part): nothing to explain
            continue
        try:
            scores.append(logme_evidence(s, u.T @ y, float(y @ y), n, d)[0])
        except (OverflowError, ZeroDivisionError, ValueError):  # the fixed point ran off to beta -> infinity
            scores.append(math.nan)
    if not all(map(math.isfinite, scores)):
        raise SelectError([f"LogME on {n} rows of {d}-dimensional features did not converge (the features fit the labels "
                           "exactly). Give it more rows (--max-rows, data.train.max_samples), or rank with --proxies probe."])
    return float(np.mean(scores))


def jackknifed(stat, features: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    """stat on every row, and its grouped jackknife standard error: stat recomputed without each fold."""
    k = int(folds.max()) + 1
    full = stat(features, labels)
    if k < 2:
        return full, 0.0
    parts = np.array([stat(features[folds != f], labels[folds != f]) for f in range(k)])
    return full, float(math.sqrt((k - 1) / k * ((parts - parts.mean()) ** 2).sum()))


# ------------------------------------------------------------------------------------------------------ a few steps

def few_steps(c: _Candidate, ds, label_names: list[str], holdout: np.ndarray, steps: int, work: Path) -> Estimate:
    """The candidate's recipe trained `steps` optimizer steps on the sample less the holdout rows, scored on them."""
    from .run import run

    work.mkdir(parents=True)
    named = ds.remove_columns("label").add_column("label", [label_names[i] for i in ds["label"]])  # names, not indices:
    for name, rows in (("train", named.select(np.flatnonzero(~holdout))), ("holdout", named.select(np.flatnonzero(holdout)))):
        rows.to_json(str(work / f"{name}.jsonl"), lines=True)                          # '1' is a name with labels 1..5
    r = copy.deepcopy(c.recipe)
    r.name, r.output_dir = "select", str(work / "run")
    d = r.data
    d.train, d.eval, d.test, d.eval_holdout = SplitConfig(path=str(work / "train.jsonl")), SplitConfig(path=str(work / "holdout.jsonl")), None, 0.0
    d.text_columns = ["text", "text_pair"] if "text_pair" in ds.column_names else ["text"]  # data.text_pair: sentence pairs
    d.label_column, d.label_names = "label", list(label_names)
    t = r.train
    t.max_steps, t.eval_every, t.save_every, t.keep_best, t.early_stopping = steps, None, None, False, None
    t.report_to = ["none"]  # a throwaway run: no wandb run uploaded or left in WANDB_DIR, no login needed, no TensorBoard
    r.export.merge = False
    validate(r)
    start = time.perf_counter()
    try:
        record = run(r, overwrite=True)
    except TrainingInterrupted as e:  # a Ctrl-C or SIGTERM: select stops (its temporary folder, the checkpoint in it, removed)
        name = signal_name(e.code)
        raise TrainingInterrupted(f"peftlab select was stopped ({name}) while the steps proxy trained {c.label} "
                                  f"{c.method}: no ranking was made, and its temporary folder is removed (there is nothing to "
                                  "resume; run select again).", code=e.code) from None
    acc, n = record.metrics["eval"]["accuracy"], int(holdout.sum())
    return Estimate(acc, math.sqrt(acc * (1 - acc) / max(n, 1)), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ select

def ranked_by(proxies, rank_by: str | None = None) -> str | None:
    """The proxy that orders the rows: the one asked for, else the probe when it runs, else the first proxy."""
    return rank_by or ("probe" if "probe" in proxies else next(iter(proxies), None))


def select(recipe: Recipe, candidates: list[str], methods: list[str] | None = None, *, proxies=("probe", "logme"),
           rank_by: str | None = None, max_rows: int = 1000, folds: int = 5, steps: int = 30,
           overrides: dict[str, list[str]] | None = None) -> list[SelectRow]:
    """Estimate how well each candidate base (x method) would do on the recipe's task, from its training split only;
    -> rows ranked by `rank_by` (default: the probe when it runs, else the first proxy), best first.

    `overrides` maps a candidate (as given) or a method to extra recipe overrides for it, e.g. {"full": ["train.lr=5e-5"]}
    (the base's apply to the feature proxies too; the method's only to `steps`). `candidates`, `methods` and `proxies`
    are lists; a single string is one item (as load_recipe takes one override), not its characters."""
    one = lambda v: [str(v)] if isinstance(v, (str, PurePath)) else v  # noqa: E731  ("/path/to/model" was 14 one-letter candidates)
    candidates, methods, proxies = one(candidates), one(methods), one(proxies)
    proxies = list(dict.fromkeys(proxies))
    rank_by = ranked_by(proxies, rank_by)
    problems = [f"proxy {p!r}: no such proxy; choose from {', '.join(PROXIES)}." for p in proxies if p not in PROXIES]
    problems += [] if proxies else [f"no proxy chosen: choose from {', '.join(PROXIES)}."]
    problems += [] if rank_by in proxies else [f"rank by {rank_by!r}: it must be one of the proxies that run ({', '.join(proxies)})."]
    problems += [] if folds >= 2 else [f"folds={folds}: cross-validation needs at least 2 folds."]
    problems += [] if max_rows >= 2 * folds else [f"max_rows={max_rows}: too few rows for {folds} folds; give at least {2 * folds}."]
    problems += [] if steps >= 1 or "steps" not in proxies else [f"steps={steps}: the steps proxy needs at least 1 optimizer step."]
    if problems:
        raise SelectError(problems)
    check_task(recipe)
    cands = build_candidates(recipe, candidates, methods, overrides or {})
    if all(c.refused for c in cands):  # before reading any data
        raise SelectError([f"candidate {c.label} ({c.method}): {c.refused}" for c in cands])
    ds, label_names = train_sample(recipe, max_rows)
    labels = np.asarray(ds["label"], dtype=np.int64)
    if len(labels) < 2 * folds:
        raise SelectError([f"the training split has {len(labels)} rows: too few for {folds} folds. Use fewer folds or more data."])
    check_classes(labels, label_names, folds, max_rows)
    fold = stratified_folds(labels, folds, recipe.train.seed)
    k = len(label_names)
    log.info("select: %d candidate(s), %d training rows, %d classes, %d folds; proxies %s", len(cands), len(labels), k, folds,
             ", ".join(proxies))
    bases: dict[str, _Base] = {}  # per base as loaded (Candidate.features_key): one encoding for its methods
    rows = []

    def base_of(c: _Candidate) -> _Base:
        key = c.features_key()
        if key not in bases and {"probe", "logme"} & set(proxies):
            try:
                bases[key] = _Base(*encode_timed(c, ds, label_names), group=len(bases) + 1)
            except Exception as e:  # the base does not encode: probe and LogME fail, the steps proxy may still train it
                bases[key] = _Base(figures={"probe": e, "logme": e})
        return bases.get(key, _Base())

    def figure(p: str, base: _Base) -> Estimate:
        """The base's probe or LogME figure, measured once for all its methods; raises the error it failed with."""
        if p not in base.figures:
            start = time.perf_counter()
            try:
                if p == "logme" and (problem := logme_rows_problem(len(labels), base.feats.shape[1], folds)):
                    raise SelectError([problem])  # (it ran, and ranked a degenerate figure or failed, as the noise fell)
                value, std = (probe(base.feats, labels, fold, k, recipe.train.seed) if p == "probe"
                              else jackknifed(lambda f, y: logme(f, y, k), base.feats, labels, fold))
                base.figures[p] = Estimate(value, std, time.perf_counter() - start)
            except Exception as e:
                base.figures[p] = e
        if isinstance(found := base.figures[p], Exception):
            raise found
        return found

    def estimate(i: int, c: _Candidate, work: Path) -> SelectRow:
        """The candidate's row: a proxy that fails (its error, any error) leaves the other proxies' figures in place."""
        base = base_of(c)
        row = SelectRow(0, c.base, c.method, base.pooling, base.feats.shape[1], len(labels), base.seconds, base.group, label=c.label)
        for p in proxies:
            try:
                row.estimates[p] = few_steps(c, ds, label_names, fold == 0, steps, work / f"steps-{i}") if p == "steps" else figure(p, base)
            except TrainingInterrupted:  # a Ctrl-C or SIGTERM stops select, as it stops train: not a failed cell
                raise
            except Exception as e:
                row.estimates[p], row.failures[p] = Estimate(math.nan, math.nan, 0.0), reason(e)
                log.error("select: %s %s %s failed: %s", c.label, c.method, p, reason(e))
                continue
            log.info("select: %s %s %s %.4f +- %.4f (%.1f s)", c.label, c.method, p, row.estimates[p].value,
                     row.estimates[p].std, row.estimates[p].seconds)
        if len(row.failures) == len(proxies):  # nothing measured: one failed row, as a candidate that cannot load
            reasons = list(dict.fromkeys(row.failures.values()))
            row.error = reasons[0] if len(reasons) == 1 else "; ".join(f"{p}: {r}" for p, r in row.failures.items())
            row.failures = {}
        return row

    with tempfile.TemporaryDirectory(prefix="peftlab-select-") as work:
        for i, c in enumerate(cands):
            if c.refused:
                rows.append(failed_row(c, proxies, len(labels), c.refused))
                continue
            try:
                rows.append(estimate(i, c, Path(work)))
            except TrainingInterrupted:  # a Ctrl-C or SIGTERM in the steps proxy's training (its handler turns it into this)
                raise
            except Exception as e:  # one candidate that cannot load or train: the others' figures are kept. Any error, not
                # only peftlab's (a damaged file raises the library's own); a Ctrl-C (a KeyboardInterrupt, or the training's
                # TrainingInterrupted, above) stops select: nothing is ranked or written, the temporary folder removed
                log.error("select: %s %s failed: %s", c.label, c.method, reason(e),
                          exc_info=None if isinstance(e, PeftlabError) else e if log.isEnabledFor(logging.DEBUG) else None)
                rows.append(failed_row(c, proxies, len(labels), reason(e)))
    if all(r.error for r in rows):
        raise SelectError([f"candidate {r.label} ({r.method}): {r.error}" for r in rows])
    rows.sort(key=lambda r: -r.estimates[rank_by].value if math.isfinite(r.estimates[rank_by].value) else math.inf)
    for i, r in enumerate(rows, 1):  # equal figures share a rank (1, 1, 3): input order is no preference; a failed row has
        same = i > 1 and r.estimates[rank_by].value == rows[i - 2].estimates[rank_by].value  # none, nor one whose rank_by failed
        r.rank = 0 if r.error or rank_by in r.failures else rows[i - 2].rank if same else i
    return rows


def signal_name(code: int) -> str:
    """An exit status of 128 + a signal's number -> that signal's name (130: SIGINT, 143: SIGTERM)."""
    import signal

    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return f"exit status {code}"


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines())


def reason(e: BaseException) -> str:
    """One line saying why a candidate failed: peftlab's message as it is (a SelectError's without its 'peftlab select:',
    which the table's line already says), another error's type before its message."""
    text = one_line(" ".join(e.problems) if isinstance(e, SelectError) else str(e))
    return text if isinstance(e, PeftlabError) else f"{type(e).__name__}: {text}" if text else type(e).__name__


def failed_row(c: _Candidate, proxies, rows: int, why: str) -> SelectRow:
    """The row of a candidate with no figures (refused before any compute, or failed): no rank, every proxy NaN, and why."""
    return SelectRow(0, c.base, c.method, "-", 0, rows, 0.0, 0, {p: Estimate(math.nan, math.nan, 0.0) for p in proxies},
                     error=why, label=c.label)


# ------------------------------------------------------------------------------------------------------ output

def total_seconds(rows: list[SelectRow]) -> float:
    """The compute the selection took: each base's features once, the shared feature proxies once, every steps run."""
    shared: dict[tuple, float] = {}
    total = 0.0
    for r in rows:
        for p, e in r.estimates.items():
            if p == "steps":
                total += e.seconds
            else:
                shared[(r.features_group, p)] = e.seconds
        shared[(r.features_group, "features")] = r.features_seconds
    return total + sum(shared.values())


def format_table(rows: list[SelectRow], rank_by: str, source: str = "the recipe") -> str:
    """The ranked table the CLI prints: each proxy's estimate +- its uncertainty and the seconds it took."""
    proxies = list(rows[0].estimates) if rows else []
    head = ["rank", "base", "method", "features", "feat s"] + [f"{PROXY_TITLES[p]} (± {UNCERTAINTY[p]})  s" for p in proxies]
    body = []
    for r in rows:
        cells = [str(r.rank or "-"), r.label, r.method, f"{r.pooling} {r.feature_dim}" if r.feature_dim else "-", f"{r.features_seconds:.1f}"]
        if r.error:  # said under the table, so the columns keep their widths
            body.append(cells + ["failed (below)"])
            continue
        for p in proxies:
            e = r.estimates[p]
            digits = 2 if p == "logme" else 3
            cells.append("failed (below)" if p in r.failures else f"{e.value:.{digits}f} ± {e.std:.{digits}f}  {e.seconds:.1f}")
        body.append(cells)
    widths = [max(len(x[i]) for x in [head, *body] if i < len(x)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *body]]
    n = rows[0].rows if rows else 0
    feature_proxies = [PROXY_TITLES[p].split()[0] for p in proxies if p in ("probe", "logme")]  # (each said only where it ran)
    notes = [f"{source}: {len(rows)} candidate(s) {'not ranked' if unranked(rows, rank_by) else 'ranked'} by {rank_by}, {n:,} "
             f"training rows; {TRAIN_ONLY}.",
             (f"{' and '.join(feature_proxies)} read the frozen base (features once per base, 'feat s'), so they rank bases, not methods."
              if len(feature_proxies) > 1 else f"{feature_proxies[0]} reads the frozen base (features once per base, 'feat s'), so it "
              "ranks bases, not methods.") if feature_proxies else "",
             "LogME: log evidence per row, higher is better." if "logme" in proxies else "",
             f"total {total_seconds(rows):.1f} s"]
    failures = [f"failed: {r.label} {r.method}: {r.error}" for r in rows if r.error]
    failures += [f"failed: {r.label} {r.method} {PROXY_TITLES[p]}: {why}" for r in rows for p, why in r.failures.items()]
    nothing = [unranked(rows, rank_by)] if unranked(rows, rank_by) else []
    return "\n".join([notes[0], "", *lines, "", *failures, *nothing, *[x for x in notes[1:] if x]])


def unranked(rows: list[SelectRow], rank_by: str) -> str | None:
    """Where no row has a rank (the proxy ranked by failed for every candidate), the line that says so; else None."""
    if not rows or any(r.rank for r in rows):
        return None
    others = [p for p in rows[0].estimates if p != rank_by and any(math.isfinite(r.estimates[p].value) for r in rows)]
    return (f"nothing could be ranked: {PROXY_TITLES[rank_by]} failed for every candidate (why: above)."
            + (f" --rank-by {others[0]} ranks by the {PROXY_TITLES[others[0]]} figures in the table." if others else ""))


def to_json(rows: list[SelectRow], rank_by: str, source: str = "the recipe", settings: dict | None = None) -> dict:
    """The table as JSON; `settings`: how it was made (the recipe's overrides, --set, sizes, seed), so it can be rerun."""
    rows_json = [{**asdict(r), "label": r.label} for r in rows]
    for r in rows_json:  # a failed row's figures: null, not NaN (which is not JSON)
        r["estimates"] = {p: {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in e.items()}
                          for p, e in r["estimates"].items()}
    return {"source": source, "settings": settings or {}, "ranked_by": rank_by, "uncertainty": {p: UNCERTAINTY[p] for p in (rows[0].estimates if rows else {})},
            "data": TRAIN_ONLY, "total_seconds": total_seconds(rows), "rows": rows_json}
