"""Shared-prefix prefill: run the part of a prompt that rows share once, and reuse it.

All candidates of one request share the system turn, the image and most of the instruction; the
ranking and selection questions that follow share the same start again. Encoding the image and
that text is most of a request's cost, so instead of prefilling every row in full:

1. rows are grouped (consecutive rows with the same image; text-only rows together) and each
   group's common token prefix is found;
2. a prefix already computed for the same image, adapter and tokens (kept in a small store) is
   reused; the others are prefilled together, once per group, in one batched forward pass;
3. the per-group caches are laid side by side (left-padded) and copied to every row of the group,
   and generation continues each row from the end of its group's prefix.

Padding between a prefix and a shorter row suffix is masked and positions follow the mask, so
every row computes exactly what it would compute alone (tests check this against plain batching).
What depends on the architecture (which tokens are image tokens, the vision inputs, how positions
continue after a prefix) is asked of the model's family (clot/families).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from clot.losses import head_bypassed


@dataclass
class Prefix:
    ids: torch.Tensor  # 1-D token ids
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1
    position_state: object  # what the family needs to continue positions after it (Qwen2.5-VL: rope delta)


def image_key(image) -> str:
    if image is None:
        return "text"
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def common_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if len(differs) else n


class PrefixStore:
    """The most recent prefixes, by (adapter, image): a prompt's ranking and selection questions
    find the prefix its generation computed."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict[tuple, list[Prefix]] = OrderedDict()
        self.hits = 0  # prefixes reused (benchmarks and tests read it)

    def clear(self) -> None:
        self.entries.clear()

    def find(self, key: tuple, ids: torch.Tensor, minimum: int) -> tuple[Prefix, int] | None:
        best = None
        for prefix in self.entries.get(key, []):
            length = common_length(prefix.ids, ids)
            if length >= minimum and (best is None or length > best[1]):
                best = (prefix, length)
        self.hits += best is not None
        return best

    def add(self, key: tuple, prefix: Prefix) -> None:
        if self.size <= 0:
            return
        bucket = self.entries.pop(key, [])
        bucket = [p for p in bucket if not torch.equal(p.ids, prefix.ids)][-3:] + [prefix]
        self.entries[key] = bucket
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def _groups(turns, rows: list[torch.Tensor], minimum: int) -> list[list[int]]:
    """Consecutive rows with the same image object that share at least `minimum` leading tokens
    form a group (a request's candidates; text-only requests apart when their prompts differ)."""
    groups: list[list[int]] = []
    for i, turn in enumerate(turns):
        if groups and turns[groups[-1][0]].image is turn.image \
                and common_length(rows[groups[-1][0]], rows[i]) >= minimum:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def share_prefixes(model, vlm, family, turns, inputs, store: PrefixStore, adapter_key: str, minimum: int,
                   pad_id: int) -> dict | None:
    """Generate inputs (with `past_key_values`) that reuse or prefill each group's prefix once;
    None when nothing worth sharing was found (then plain batching is used)."""
    from transformers import DynamicCache

    ids, mask, kinds = inputs["input_ids"], inputs["attention_mask"].bool(), family.image_token_mask(inputs)
    rows = [ids[i][mask[i]] for i in range(len(turns))]
    row_kinds = [kinds[i][mask[i]] for i in range(len(turns))]
    groups = _groups(turns, rows, minimum)
    image_rows = [i for i, t in enumerate(turns) if t.image is not None]

    plans = []  # per group: (prefix length, reused Prefix or None, store key)
    for group in groups:
        first = rows[group[0]]
        length = min(len(rows[i]) for i in group) - 1  # every row keeps at least one token to run
        for i in group[1:]:
            length = min(length, common_length(first, rows[i]))
        if any(row_kinds[i][length:].any() for i in group):
            return None  # image tokens after the shared part: cannot split there
        if length < 1:
            return None
        key = (adapter_key, image_key(turns[group[0]].image))
        found = store.find(key, first[:length], minimum)
        plans.append((found[1], found[0], key) if found is not None else (length, None, key))

    fresh = [g for g, plan in enumerate(plans) if plan[1] is None]
    computed: dict[int, Prefix] = {}
    if fresh:
        width = max(plans[g][0] for g in fresh)
        batch_ids = torch.full((len(fresh), width), pad_id, dtype=ids.dtype, device=ids.device)
        batch_mask = torch.zeros_like(batch_ids)
        batch_kinds = torch.zeros_like(batch_ids)
        vision_rows = []
        for row, g in enumerate(fresh):
            length, first = plans[g][0], groups[g][0]
            batch_ids[row, width - length:] = rows[first][:length]
            batch_mask[row, width - length:] = 1
            batch_kinds[row, width - length:] = row_kinds[first][:length]
            if turns[first].image is not None:
                vision_rows.append(image_rows.index(first))
        vision = family.vision_inputs(inputs, vision_rows) if vision_rows else {}
        cache = DynamicCache(config=vlm.config)
        with head_bypassed(model.get_output_embeddings()):  # only the cache is wanted: no logits at all
            states = family.prefill(model, vlm, batch_ids, batch_mask, batch_kinds, cache, vision)
        for row, g in enumerate(fresh):
            length = plans[g][0]
            layers = [(layer.keys[row:row + 1, :, width - length:].clone(),
                       layer.values[row:row + 1, :, width - length:].clone()) for layer in cache.layers]
            computed[g] = Prefix(rows[groups[g][0]][:plans[g][0]].clone(), layers, states[row])
            store.add(plans[g][2], computed[g])

    # Lay the groups' prefixes side by side, left-padded, then give every row its group's copy.
    prefixes = [computed.get(g) or plan[1] for g, plan in enumerate(plans)]
    lengths = [plan[0] for plan in plans]
    width = max(lengths)
    tail = max(len(rows[i]) - lengths[g] for g, group in enumerate(groups) for i in group)
    full = torch.full((len(turns), width + tail), pad_id, dtype=ids.dtype, device=ids.device)
    full_mask = torch.zeros_like(full)
    full_kinds = torch.zeros_like(full)
    for g, group in enumerate(groups):
        length = lengths[g]
        for i in group:
            suffix = rows[i][length:]
            full[i, width - length:width] = rows[i][:length]
            full_mask[i, width - length:width] = 1
            full_kinds[i, width - length:width] = row_kinds[i][:length]
            full[i, width + tail - len(suffix):] = suffix
            full_mask[i, width + tail - len(suffix):] = 1
    row_states = [prefixes[g].position_state for g, group in enumerate(groups) for _ in group]
    continuation = family.continuation(vlm, row_states, full_mask, full_kinds)
    if continuation is None:
        return None

    combined = DynamicCache(config=vlm.config)
    for layer in range(len(prefixes[0].layers)):
        keys, values = [], []
        for prefix, length in zip(prefixes, lengths):
            k, v = prefix.layers[layer][0][:, :, :length], prefix.layers[layer][1][:, :, :length]
            pad = (0, 0, width - length, 0)
            keys.append(torch.nn.functional.pad(k, pad))
            values.append(torch.nn.functional.pad(v, pad))
        combined.update(torch.cat(keys), torch.cat(values), layer)
    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=ids.device)
    combined.batch_select_indices(owner)
    return {"input_ids": full, "attention_mask": full_mask, "past_key_values": combined, **continuation}
