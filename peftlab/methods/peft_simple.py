"""peft methods that need nothing beyond their config: IA3, LoHa, LoKr, VeRA, OFT."""

from __future__ import annotations

from .base import register
from .peft_adapter import peft_method

# peft's LoHa/LoKr size their update from the base layer's weight, which in a 4-bit layer is the packed storage
PACKED_4BIT = ("peft's {name} sizes its update from the base layer's weight, which in a 4-bit layer is the packed storage (half the "
               "elements, one column), so the forward pass fails. Use quant.mode=8bit or none, or a method with 4-bit support "
               "(lora, adalora, ia3, vera, oft).")

# their r is the rank of a low-rank factor of each layer's update (LoHa's two, LoKr's second, VeRA's shared pair): above
# a layer's min(in, out) it adds nothing (model.rank_problem)
IA3 = register(peft_method("ia3", "IA3Config", lambda a: {}))
LOHA = register(peft_method("loha", "LoHaConfig", lambda a: dict(r=a.r, alpha=a.alpha, rank_dropout=a.dropout), rank_fields=("r",),
                            quant_modes=("none", "8bit"), quant_refusal=PACKED_4BIT))
LOKR = register(peft_method("lokr", "LoKrConfig", lambda a: dict(r=a.r, alpha=a.alpha, rank_dropout=a.dropout), rank_fields=("r",),
                            quant_modes=("none", "8bit"), quant_refusal=PACKED_4BIT))
VERA = register(peft_method("vera", "VeraConfig", lambda a: dict(r=a.r, vera_dropout=a.dropout), rank_fields=("r",)))
# OFT is sized by r (blocks per layer) or by oft_block_size, not both: a block size in adapter.options replaces r
OFT = register(peft_method("oft", "OFTConfig", lambda a: dict(r=0 if a.options.get("oft_block_size") else a.r, oft_block_size=0,
                                                              module_dropout=a.dropout), open_options=("oft_block_size",),
                             check_on_meta=True))  # (r or the block size must divide every adapted layer's input width)
