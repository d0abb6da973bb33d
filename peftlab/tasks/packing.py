"""Packing SFT's training rows, and the check that a base keeps packed examples apart.

`pack` best-fits whole examples (never split) into rows of at most data.max_length tokens; each row keeps its examples'
position ids, restarting at 0 at each. sft's collator then passes no attention mask, so transformers' masking_utils
(find_packed_sequence_indices) builds a block-diagonal causal mask: no token attends across examples. A base whose mask
ignores those position ids (OPT; Bloom and MPT take none) would train every example on the ones packed before it: it is
refused from its config (`architecture_problem`, for `validate`) and by a probe of the loaded base (`loaded_model_problem`,
in `train`).
"""

from __future__ import annotations

import bisect
import logging

import torch

log = logging.getLogger(__name__)


def pack(ds, max_length: int):
    """Training rows (input_ids, labels, length, truncated) best-fit into rows of <= max_length tokens, longest first;
    each packed row also has position_ids (restarting at each example) and n_examples."""
    import datasets

    lengths = ds["length"]
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    bins: list[list[int]] = []
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    ids, labels = ds["input_ids"], ds["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "truncated": [], "n_examples": []}
    trunc = ds["truncated"]
    for b in bins:
        rows["input_ids"].append([t for i in b for t in ids[i]])
        rows["labels"].append([t for i in b for t in labels[i]])
        rows["position_ids"].append([p for i in b for p in range(lengths[i])])
        rows["length"].append(sum(lengths[i] for i in b))
        rows["truncated"].append(any(trunc[i] for i in b))
        rows["n_examples"].append(len(b))
    log.info("packing: %s examples into %s rows of <= %d tokens (%.0f%% full)", f"{len(ds):,}", f"{len(bins):,}", max_length,
             100 * sum(lengths) / max(len(bins) * max_length, 1))
    return datasets.Dataset.from_dict(rows)


# architectures whose attention mask transformers builds without the position ids (OPT calls create_causal_mask without
# them; Bloom and MPT take none): a packed example attends to the ones before it. The probe at load (packing_leak) finds
# them too; this list lets `validate` say it from the config alone.
UNPACKED_MASK = ("opt", "bloom", "mpt")
PACKING_LEAKS = ("data.packing=true with a {kind} base ({name}): transformers builds its attention mask without the position "
                 "ids that mark where each packed example starts, so every example would attend to the ones packed before it "
                 "and train on them, silently{measured}. Set data.packing=false (or use a base that keeps packed examples "
                 "apart: Llama, Qwen2, GPT-2, GPT-NeoX, Phi, Falcon, ...).")
PROBE_TOLERANCE = 1e-4  # of the logits' scale: with the block-diagonal mask the second example's logits are the same bits


def architecture_problem(recipe, config) -> str | None:
    """`validate` (from the base's config) and `train`: data.packing on an architecture of UNPACKED_MASK."""
    kind = getattr(config, "model_type", None)
    if recipe.data.packing and kind in UNPACKED_MASK:
        return PACKING_LEAKS.format(kind=kind, name=recipe.model.name, measured="")
    return None


def packing_leak(model) -> float:
    """How far one example's logits move with the example packed before it (two rows: the same 4 tokens behind two
    different 5-token examples, position ids restarting at each, no attention mask, as the collator packs them),
    relative to the logits' scale: 0 where transformers builds the block-diagonal mask. One forward of 2 x 9 tokens."""
    embed = model.get_input_embeddings()
    vocab, device = embed.weight.shape[0], embed.weight.device
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(vocab // 4, vocab, (2, 5), generator=g), torch.randint(vocab // 4, vocab, (4,), generator=g)
    ids = torch.cat([first, second.expand(2, -1)], 1).to(device)
    positions = torch.tensor([[*range(5), *range(4)]] * 2, device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 5:].float()
    finally:
        model.train(training)
    return ((logits[0] - logits[1]).abs().max() / logits.abs().max().clamp_min(1e-12)).item()


def loaded_model_problem(model, recipe) -> str | None:
    """`train`, the base just loaded (no adapter yet): with data.packing, does it keep packed examples apart (packing_leak)?
    A base on the meta device (sharded loading) is left to architecture_problem."""
    if not recipe.data.packing or any(p.is_meta for p in model.parameters()):
        return None
    kind = getattr(model.config, "model_type", "?")
    try:
        leak = packing_leak(model)
    except Exception as e:  # (a forward that takes no position ids, or fails on them: it cannot pack either)
        return PACKING_LEAKS.format(kind=kind, name=recipe.model.name, measured=f" (a packed row fails in its forward: "
                                    f"{type(e).__name__}: {str(e)[:200]})")
    if leak > PROBE_TOLERANCE:
        return PACKING_LEAKS.format(kind=kind, name=recipe.model.name, measured=f" (measured at load: an example's logits "
                                    f"moved by {leak:.1e} of their scale with the example packed before it)")
    return None
